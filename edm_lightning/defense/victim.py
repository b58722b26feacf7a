"""Building the served model from checkpoints: the one way attacks and evaluations get a victim."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edm_lightning.defense.checkpoints import classifier_net, read_checkpoint
from edm_lightning.defense.defended import DefendedModel, FixedRouter
from edm_lightning.defense.postprocess import build_postprocessors, resolve_postprocessor
from edm_lightning.defense.routing import build_router
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net

__all__ = ["VictimConfig", "load_defended"]


@dataclass
class VictimConfig:
    """The model an oracle serves, as configs name it.

    Args:
        checkpoint: a target (``ClassifierModule``) or EDM ensemble checkpoint.
        router: how an ensemble picks the answering member: ``fixed`` (always ``member``), ``neural``
            (the paper's hash network) or ``keyed`` (keyed hash of the quantised input).
        hash_checkpoint: the hash network's checkpoint, for ``router: neural``.
        key: secret key of the ``keyed`` router.
        member: the member that answers under ``router: fixed``.
        postprocessors: output-perturbation defenses applied to every answer, in this order, each as
            ``{class_path: ReverseSigmoid, init_args: {beta: 0.3}}`` (a name from
            :mod:`edm_lightning.defense.postprocess` or a dotted path). The served model's
            ``num_classes`` and ``input_shape`` are passed to those that take them. So "EDM + Adaptive
            Misinformation" is this list on an ensemble checkpoint; the undefended target + the same
            list is the defense alone.
    """

    checkpoint: str
    router: str = "fixed"
    hash_checkpoint: str | None = None
    key: str = "edm-lightning"
    member: int = 0
    postprocessors: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.postprocessors, (list, tuple)):
            raise ConfigError(f"postprocessors must be a list of {{class_path, init_args}} mappings, got {self.postprocessors!r}")
        for position, spec in enumerate(self.postprocessors):
            resolve_postprocessor(spec, position)  # a misspelt class fails here, before any checkpoint is read

    def build(self) -> DefendedModel:
        return load_defended(self)


def load_defended(config: VictimConfig) -> DefendedModel:
    """A DefendedModel in eval mode on CPU from ``config``; unreadable, foreign or inconsistent checkpoints fail clearly.

    A checkpoint whose hyper-parameters contain ``num_members`` is an EDM ensemble
    (:class:`~edm_lightning.models.EnsembleModule`), served behind ``config.router``; one with ``arch``
    only is a single target (:class:`~edm_lightning.models.ClassifierModule`), served by a fixed router.
    The file is read once; the nets are rebuilt from its hyper-parameters and given its weights (no
    LightningModule is built, so this is safe while LightningCLI instantiates the DataModule that calls it).

    Raises:
        CheckpointNotFoundError: no file at ``config.checkpoint``.
        ConfigError: an unreadable, foreign or inconsistent checkpoint, or a router it cannot be served behind.
    """
    path = Path(config.checkpoint)
    state = read_checkpoint(path, "Victim")
    hparams = state["hyper_parameters"]
    if "num_members" in hparams:
        model = _load_ensemble(path, state, config)
    elif "arch" in hparams:
        model = _load_target(path, state, config)
    else:
        raise ConfigError(f"{str(path)!r} is not a target or EDM ensemble checkpoint (hyper-parameters: {sorted(hparams)})")
    model.postprocessors.extend(build_postprocessors(config.postprocessors, model.num_classes, model.input_shape))
    return model.eval()


def _load_target(path: Path, state: dict, config: VictimConfig) -> DefendedModel:
    if config.router != "fixed" or config.member != 0:
        raise ConfigError(
            f"{str(path)!r} is a single-model checkpoint: router must be 'fixed' with member 0, "
            f"got router={config.router!r}, member={config.member}"
        )
    _check_weights(path, state, "net.", expected_members=None)
    hp = state["hyper_parameters"]
    net = classifier_net(hp, _weights(state, "net."))
    return DefendedModel([net], FixedRouter(1), tuple(hp["input_shape"]), int(hp["num_classes"])).eval()


def _load_ensemble(path: Path, state: dict, config: VictimConfig) -> DefendedModel:
    hp = state["hyper_parameters"]
    num_members = int(hp["num_members"])
    if config.router == "fixed" and not 0 <= config.member < num_members:
        raise ConfigError(f"member must be in [0, {num_members}) for the {num_members}-member ensemble {str(path)!r}, got {config.member}")
    # Build the router first: a missing or mismatched hash network fails before the members load.
    router = build_router(
        config.router, num_members, member=config.member, key=config.key,
        hash_checkpoint=config.hash_checkpoint, input_shape=tuple(hp["input_shape"]),
    )
    _check_weights(path, state, "members.", expected_members=num_members)
    members = [classifier_net(hp, _weights(state, f"members.{index}.")) for index in range(num_members)]
    return DefendedModel(members, router, tuple(hp["input_shape"]), int(hp["num_classes"])).eval()


def _weights(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}


def _check_weights(path: Path, state: dict, prefix: str, expected_members: int | None) -> None:
    """The weights must have the shape the hyper-parameters describe; say both sides when they do not."""
    hp = state["hyper_parameters"]
    weights = {k[len(prefix):]: v for k, v in state.get("state_dict", {}).items() if k.startswith(prefix)}
    if expected_members is not None:
        found = sorted({int(k.split(".", 1)[0]) for k in weights})
        if len(found) != expected_members:
            raise ConfigError(
                f"{str(path)!r} is inconsistent: its hyper-parameters say num_members={expected_members}, "
                f"its weights hold {len(found)} members"
            )
        weights = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("0.")}
    try:
        reference = build_net(hp["arch"], tuple(hp["input_shape"]), int(hp["num_classes"]), hp.get("mean"), hp.get("std"))
    except ValueError as err:
        raise ConfigError(f"{str(path)!r} has unusable hyper-parameters: {err}") from None
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        first = differ[0]
        raise ConfigError(
            f"{str(path)!r} is inconsistent: its hyper-parameters describe arch={hp['arch']!r}, "
            f"num_classes={hp['num_classes']}, input_shape={tuple(hp['input_shape'])} "
            f"({first}: {expected.get(first, 'absent')}), but its weights have {first}: {found.get(first, 'absent')} "
            f"({len(differ)} tensor(s) differ)"
        )
