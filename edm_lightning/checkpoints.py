"""Reading classifier checkpoints: one safe read, nets rebuilt from their hyper-parameters.

Checkpoints may come from someone else, so a file is read once with ``torch.load(weights_only=True)`` and
every net is rebuilt by name (:func:`~edm_lightning.nets.build_net`) from the hyper-parameters it was saved
with, then given its weights: no training class is imported or instantiated to serve a model. The one
loader here serves targets, EDM ensembles, hash networks and misinformation models alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from edm_lightning.errors import CheckpointNotFoundError, ConfigError, unreadable_file_reason
from edm_lightning.files import SHIPPED_CONFIGS
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig

# The plain-data classes this package's hyper-parameters hold: torch.load(weights_only=True) accepts these, nothing else
# (OptimConfig also under edm_lightning.models.optim, where checkpoints saved before it moved recorded it).
torch.serialization.add_safe_globals([OptimConfig, (OptimConfig, "edm_lightning.models.optim.OptimConfig")])

#: Checkpoint entry where this package's LightningModules record their class (``NetModule``, ``EnsembleModule``).
CLASS_KEY = "edm_lightning_class"

__all__ = [
    "CLASS_KEY",
    "check_structure",
    "checkpoint_class",
    "checkpoint_nets",
    "configured_checkpoints",
    "is_ensemble",
    "load_classifier_net",
    "missing_checkpoint_message",
    "read_checkpoint",
    "train_command",
    "trained_on",
]


def read_checkpoint(path: str | Path, what: str, train_hint: str | None = None) -> dict[str, Any]:
    """The contents of a Lightning checkpoint, read without running any code it may hold.

    Args:
        path: the ``.ckpt`` file.
        what: what the file should be, for messages ("Victim", "Hash network").
        train_hint: how such a checkpoint is trained, for the message when it is missing and no config writes
            ``path`` (:func:`train_command` names the exact command when one does).

    Returns:
        The checkpoint's dict (``state_dict``, ``hyper_parameters`` and Lightning's other entries).

    Raises:
        CheckpointNotFoundError: no file at ``path``; the message names the command that writes it.
        ConfigError: the file is not a readable checkpoint (truncated, holding other Python objects, or
            without hyper-parameters).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(missing_checkpoint_message(path, what, train_hint))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError) as err:  # torch's archive reader on a file cut short or damaged
        command = train_command(path) or train_hint
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a readable Lightning checkpoint: it is cut short or "
                          f"damaged ({unreadable_file_reason(err)}); restore it from a backup, or train it again"
                          + (f" ({command})" if command else "")) from None
    except Exception as err:
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a readable Lightning checkpoint: "
                          f"{unreadable_file_reason(err)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("hyper_parameters"), dict):
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a Lightning checkpoint with hyper-parameters")
    return state


def train_command(path: str | Path) -> str | None:
    """The command that writes checkpoint ``path``: a shipped config's, or that of the ``config.yaml`` beside it (a
    stage of the experiment runner), whose ``ModelCheckpoint`` saves exactly this file.

    Relative paths are taken from the current folder, as the CLI takes a config's ``dirpath``.

    Returns:
        ``python main.py fit --config <config>``, or ``None`` when no such config names ``path``.

    Example:
        >>> train_command("runs/misinformation/checkpoints/best.ckpt")
        'python main.py fit --config configs/misinformation.yaml'
    """
    target = os.path.abspath(path)
    beside = [folder / "config.yaml" for folder in (Path(path).parent, Path(path).parent.parent)]
    for config in [*sorted(SHIPPED_CONFIGS.rglob("*.yaml")), *(c for c in beside if c.is_file())]:
        if target in {os.path.abspath(file) for file in _checkpoint_files(config)}:
            shipped = config.is_relative_to(SHIPPED_CONFIGS)
            return f"python main.py fit --config {f'configs/{config.relative_to(SHIPPED_CONFIGS)}' if shipped else config}"
    return None


def missing_checkpoint_message(path: str | Path, what: str, train_hint: str | None = None) -> str:
    """What to say of a checkpoint that does not exist: the command that writes it (:func:`train_command`), else
    ``train_hint``, else the files the shipped configs write (a mistyped path shows beside them).

    Returns:
        One sentence or two, ``"<what> checkpoint '<path>' does not exist. Train it first (<command>)."``.
    """
    command = train_command(path) or train_hint
    if command:
        return f"{what} checkpoint {str(path)!r} does not exist. Train it first ({command})."
    written = [f"{file} (configs/{config.relative_to(SHIPPED_CONFIGS)})"
               for config in sorted(SHIPPED_CONFIGS.glob("*.yaml")) for file in _checkpoint_files(config, best_only=True)]
    return (f"{what} checkpoint {str(path)!r} does not exist. Train it first with the config that writes it, or check "
            f"the path: no shipped config writes it (they write {', '.join(written)}).")


def configured_checkpoints(callbacks: Any) -> dict[str, list[Path]]:
    """The files a config's ``ModelCheckpoint`` callbacks write, by Lightning's names for them.

    Args:
        callbacks: ``trainer.callbacks`` of a config, as YAML mappings or as the CLI parsed them
            (``class_path``, ``init_args``); anything else names no file.

    Returns:
        ``{"best": [dirpath/filename.ckpt for a fixed, monitored filename], "last": [dirpath/last.ckpt with save_last]}``.
    """
    files: dict[str, list[Path]] = {"best": [], "last": []}
    for callback in callbacks if isinstance(callbacks, list) else []:
        if not hasattr(callback, "get") or not str(callback.get("class_path") or "").endswith("ModelCheckpoint"):
            continue
        init_args = callback.get("init_args") or {}
        dirpath, filename = init_args.get("dirpath"), init_args.get("filename")
        if not dirpath:
            continue
        if filename and "{" not in str(filename) and init_args.get("monitor"):
            files["best"].append(Path(dirpath) / f"{filename}.ckpt")
        if init_args.get("save_last"):
            files["last"].append(Path(dirpath) / "last.ckpt")
    return files


def _checkpoint_files(config: Path, best_only: bool = False) -> list[Path]:
    """The checkpoint files the LightningCLI config file ``config`` writes (:func:`configured_checkpoints`).

    Returns:
        The files (``best`` ones only with ``best_only``); none for a file that is not such a config.
    """
    try:
        job = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    trainer = job.get("trainer") if isinstance(job, dict) else None
    files = configured_checkpoints(trainer.get("callbacks") if isinstance(trainer, dict) else None)
    return files["best"] if best_only else files["best"] + files["last"]


def is_ensemble(state: dict[str, Any]) -> bool:
    """Whether a checkpoint read by :func:`read_checkpoint` holds an EDM ensemble (its hyper-parameters have ``num_members``)."""
    return "num_members" in state["hyper_parameters"]


def checkpoint_class(state: dict[str, Any]) -> str | None:
    """The LightningModule class a checkpoint was trained as, as LightningCLI or the module itself recorded it.

    Returns:
        The class name (``EnsembleModule``), or ``None`` for a checkpoint that does not say (an older one).
    """
    class_path = state["hyper_parameters"].get("_class_path") or state.get(CLASS_KEY)
    return str(class_path).rpartition(".")[2] if class_path else None


def trained_on(state: dict[str, Any]) -> str | None:
    """The dataset a checkpoint was trained on, when its DataModule's hyper-parameters were saved with it.

    Returns:
        The registry name (``fashionmnist``), or ``None`` if the checkpoint does not say.
    """
    data = state.get("datamodule_hyper_parameters")
    return str(data["dataset"]) if isinstance(data, dict) and data.get("dataset") else None


def check_structure(saved: dict[str, Any], configured: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Refuse a checkpoint whose weights have another shape than the model they would be loaded into.

    Args:
        saved: the checkpoint's hyper-parameters.
        configured: the model's.
        keys: the hyper-parameters that fix the weights' shapes (``arch``, ``num_classes``, ...).
        what: the model, for the message.

    Raises:
        ConfigError: a key differs (each difference named, checkpoint vs config).
    """
    def plain(value: Any) -> Any:  # YAML gives lists where code gives tuples
        return tuple(value) if isinstance(value, (list, tuple)) else value

    differ = [key for key in keys if plain(saved.get(key)) != plain(configured.get(key))]
    if differ:
        raise ConfigError(f"the checkpoint does not match the configured {what}: " + "; ".join(
            f"{key}: checkpoint {saved.get(key)!r}, config {configured.get(key)!r}" for key in differ))


def checkpoint_nets(state: dict[str, Any], path: str | Path, what: str) -> list[nn.Module]:
    """The frozen nets of a checkpoint: ``num_members`` of them for an ensemble, one for a single classifier.

    The weights are checked against the shapes the hyper-parameters (``arch``, ``input_shape``,
    ``num_classes``) describe before any is loaded, and a mismatch names both sides.

    Args:
        state: what :func:`read_checkpoint` returned for ``path``.
        path: the file, for messages.
        what: what the file should be, for messages.

    Returns:
        The nets in eval mode, gradients off, on CPU.

    Raises:
        ConfigError: the hyper-parameters describe no buildable net, or the weights do not fit them.
    """
    hp = state["hyper_parameters"]
    missing = [key for key in ("arch", "input_shape", "num_classes") if key not in hp]
    if missing:
        raise ConfigError(f"{what} {str(path)!r} is not a classifier checkpoint: its hyper-parameters lack "
                          f"{', '.join(missing)} (they have: {', '.join(sorted(hp)) or 'nothing'})")
    try:
        reference = build_net(hp["arch"], tuple(hp["input_shape"]), int(hp["num_classes"]), hp.get("mean"), hp.get("std"))
    except (ConfigError, ValueError, TypeError) as err:
        raise ConfigError(f"{what} {str(path)!r} has unusable hyper-parameters: {err}") from None
    weights = state.get("state_dict")
    if not isinstance(weights, dict):
        raise ConfigError(f"{what} {str(path)!r} holds no state_dict")
    if is_ensemble(state):
        count = int(hp["num_members"])
        members = _strip(weights, "members.")
        found = sorted({key.split(".", 1)[0] for key in members}, key=lambda index: (len(index), index))
        if found != [str(i) for i in range(count)]:  # numeric order: "10" after "9"
            raise ConfigError(f"{what} {str(path)!r} is inconsistent: its hyper-parameters say num_members={count}, "
                              f"its weights hold {len(found)} members")
        parts = [_strip(members, f"{index}.") for index in range(count)]
    else:
        parts = [_strip(weights, "net.")]
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    nets = []
    for part in parts:
        found_shapes = {key: tuple(value.shape) for key, value in part.items()}
        if found_shapes != expected:
            differ = sorted(k for k in expected.keys() | found_shapes.keys() if expected.get(k) != found_shapes.get(k))
            first = differ[0]
            raise ConfigError(
                f"{what} {str(path)!r} is inconsistent: its hyper-parameters describe arch={hp['arch']!r}, "
                f"num_classes={hp['num_classes']}, input_shape={tuple(hp['input_shape'])} "
                f"({first}: {expected.get(first, 'absent')}), but its weights have {first}: "
                f"{found_shapes.get(first, 'absent')} ({len(differ)} tensor(s) differ)"
            )
        net = build_net(hp["arch"], tuple(hp["input_shape"]), int(hp["num_classes"]), hp.get("mean"), hp.get("std"))
        net.load_state_dict(part)
        nets.append(net.eval().requires_grad_(False))
    return nets


def load_classifier_net(path: str | Path, what: str = "classifier",
                        train_hint: str | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
    """The frozen net of a single-classifier checkpoint (target, hash network, misinformation model, clone).

    Returns:
        ``(net, hyper-parameters, the whole checkpoint)``; the checkpoint for entries beside the weights.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        ConfigError: not a readable single-classifier checkpoint (an ensemble included); the message names the file.
    """
    state = read_checkpoint(path, what, train_hint)
    if is_ensemble(state):
        raise ConfigError(f"{what} {str(path)!r} is an EDM ensemble checkpoint; a single classifier is expected here")
    (net,) = checkpoint_nets(state, path, what)
    return net, dict(state["hyper_parameters"]), state


def _strip(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
