"""Reading classifier checkpoints: one safe read, nets rebuilt from their hyper-parameters.

Checkpoints may come from someone else, so a file is read once with ``torch.load(weights_only=True)`` and
every net is rebuilt by name (:func:`~edm_lightning.nets.build_net`) from the hyper-parameters it was saved
with, then given its weights: no training class is imported or instantiated to serve a model. The one
loader here serves targets, EDM ensembles, hash networks and misinformation models alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edm_lightning.errors import CheckpointNotFoundError, ConfigError, unreadable_file_reason
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
    "is_ensemble",
    "load_classifier_net",
    "read_checkpoint",
    "trained_on",
]


def read_checkpoint(path: str | Path, what: str, train_hint: str = "python main.py fit --config ...") -> dict[str, Any]:
    """The contents of a Lightning checkpoint, read without running any code it may hold.

    Args:
        path: the ``.ckpt`` file.
        what: what the file should be, for messages ("Victim", "Hash network").
        train_hint: the command that trains such a checkpoint, for the message when it is missing.

    Returns:
        The checkpoint's dict (``state_dict``, ``hyper_parameters`` and Lightning's other entries).

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        ConfigError: the file is not a readable checkpoint (truncated, holding other Python objects, or
            without hyper-parameters).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} checkpoint {str(path)!r} does not exist. Train it first ({train_hint}).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a readable Lightning checkpoint: "
                          f"{unreadable_file_reason(err)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("hyper_parameters"), dict):
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a Lightning checkpoint with hyper-parameters")
    return state


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
                        train_hint: str = "python main.py fit --config ...") -> tuple[nn.Module, dict[str, Any], dict]:
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
