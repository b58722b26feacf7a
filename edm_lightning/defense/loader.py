"""The victim as configs name it (:class:`VictimConfig`) and the one way to build it from checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse.typing import SecretStr

from edm_lightning.checkpoints import (
    checkpoint_class,
    checkpoint_nets,
    is_ensemble,
    missing_checkpoint_message,
    read_checkpoint,
    trained_on,
)
from edm_lightning.defense.detectors import DetectorConfig
from edm_lightning.defense.postprocessors import PostprocessorConfig, build_postprocessors
from edm_lightning.defense.victim import Victim
from edm_lightning.errors import CheckpointNotFoundError, ConfigError
from edm_lightning.routing import (
    FixedRouter,
    RouterConfig,
    as_secret,
    build_router,
    check_key_fingerprint,
    plain_router,
    router_class,
    router_label,
)

__all__ = ["VictimConfig", "load_victim"]

#: How a victim's checkpoint is trained, for the message when it is missing and no config writes it.
VICTIM_HINT = ("a target: python main.py fit --config configs/baseline.yaml; an EDM ensemble: python main.py fit "
               "--config configs/edm.yaml")
#: How a hash network is trained, likewise.
HASH_HINT = "python main.py fit --config configs/hashnet.yaml"


@dataclass
class VictimConfig:
    """The model an oracle serves, as configs name it.

    Args:
        checkpoint: a target (``ClassifierModule``) or EDM ensemble checkpoint.
        router: how an ensemble picks the answering member: ``fixed`` (always ``member``), ``neural``
            (the paper's hash network), ``keyed`` (keyed hash of the quantised input) or ``coarse`` (keyed hash of
            a coarse view of the input), or any registered router; with its own settings as
            ``{class_path: coarse, init_args: {grid: 5, levels: 4}}``.
        hash_checkpoint: the hash network's checkpoint, for ``router: neural``.
        key: secret key of the keyed routers ``keyed``, ``coarse`` and ``aligned``
            (``None``: ``$EDM_ROUTER_KEY``, ``$EDM_ROUTER_KEY_FILE``, or the
            public default with a warning); never written, shown as ``**********`` in config dumps.
        key_fingerprint: the fingerprint the router key must have
            (:func:`~edm_lightning.routing.key_fingerprint`, public); a config written by the experiment runner
            records it, so a job re-run by hand without the experiment's key is refused instead of silently routing
            with another key. ``None``: not checked.
        member: the member that answers under ``router: fixed``.
        postprocessors: output-perturbation defenses applied to every answer, in this order, each as
            ``{class_path: ReverseSigmoid, init_args: {beta: 0.3}}`` (a name from
            :data:`~edm_lightning.defense.postprocessors.POSTPROCESSORS` or a dotted path). The victim's
            ``num_classes`` and ``input_shape`` are passed to those that take them. So "EDM + Adaptive
            Misinformation" is this list on an ensemble checkpoint; the undefended target + the same
            list is the defense alone.
    """

    checkpoint: str
    router: str | RouterConfig = "fixed"
    hash_checkpoint: str | None = None
    key: SecretStr | None = None
    key_fingerprint: str | None = None
    member: int = 0
    postprocessors: list[PostprocessorConfig] = field(default_factory=list)
    detector: DetectorConfig | None = None

    def __post_init__(self) -> None:
        self.key = as_secret(self.key)  # a plain string from Python is hidden too (repr, logs)
        self.router = plain_router(self.router)  # an unknown router, or init_args it does not take, fail here
        if not isinstance(self.postprocessors, (list, tuple)):
            raise ConfigError(f"postprocessors must be a list of {{class_path, init_args}} mappings, got {self.postprocessors!r}")
        checked = []
        for position, config in enumerate(self.postprocessors):  # misspelt classes and arguments fail here
            checked.append(PostprocessorConfig.parse(config, position).as_dict())
        self.postprocessors = checked  # plain {class_path, init_args} mappings from here on
        if isinstance(self.detector, dict):
            try:
                self.detector = DetectorConfig(**self.detector)
            except TypeError as err:
                raise ConfigError(f"detector: {err}; its settings: {', '.join(DetectorConfig.__dataclass_fields__)}") from None

    def build(self) -> Victim:
        """The victim this config names (:func:`load_victim`)."""
        return load_victim(self)


def load_victim(config: VictimConfig) -> Victim:
    """The :class:`Victim` ``config`` names, in eval mode on CPU; unreadable, foreign or inconsistent checkpoints fail clearly.

    A checkpoint whose hyper-parameters contain ``num_members`` is an EDM ensemble
    (:class:`~edm_lightning.models.EnsembleModule`), served behind ``config.router``; one with ``arch``
    only is a single target (:class:`~edm_lightning.models.ClassifierModule`), served by a fixed router.
    The file is read once; the nets are rebuilt from its hyper-parameters and given its weights (no
    LightningModule is built, so this is safe while LightningCLI instantiates the DataModule that calls it).

    Returns:
        The victim, ready to answer queries.

    Raises:
        CheckpointNotFoundError: a checkpoint the victim needs does not exist (the victim's, the hash network's, a
            post-processor's ``.ckpt``); the message names every missing one with the command that trains it.
        ConfigError: an unreadable, foreign or inconsistent checkpoint, or a router it cannot be served behind.
    """
    _check_checkpoints_exist(config)
    path = Path(config.checkpoint)
    state = read_checkpoint(path, "Victim", VICTIM_HINT)
    hp = state["hyper_parameters"]
    if not {"arch", "input_shape", "num_classes"} <= hp.keys():
        raise ConfigError(f"{str(path)!r} is not a target or EDM ensemble checkpoint (hyper-parameters: {sorted(hp)})")
    kind = checkpoint_class(state)
    if kind is not None and kind not in VICTIM_CLASSES:
        raise ConfigError(f"{str(path)!r} is a {kind} checkpoint; a victim is a target (ClassifierModule, "
                          "configs/baseline.yaml) or an EDM ensemble (EnsembleModule, configs/edm.yaml)")
    input_shape, num_classes = tuple(hp["input_shape"]), int(hp["num_classes"])
    if is_ensemble(state):
        num_members = int(hp["num_members"])
        if router_class(config.router) is FixedRouter and not 0 <= config.member < num_members:
            raise ConfigError(f"member must be in [0, {num_members}) for the {num_members}-member ensemble "
                              f"{str(path)!r}, got {config.member}")
        if config.key_fingerprint is not None and router_class(config.router).keyed:
            check_key_fingerprint(config.key, config.key_fingerprint,
                                  f"the {router_label(config.router)} router of {str(path)!r}")
        # The router first: a missing or mismatched hash network fails before the members load.
        router = build_router(config.router, num_members, member=config.member, key=config.key,
                              hash_checkpoint=config.hash_checkpoint, input_shape=input_shape,
                              ensemble_data=trained_on(state))
    else:
        if router_class(config.router) is not FixedRouter or config.member != 0:
            raise ConfigError(
                f"{str(path)!r} is a single-model checkpoint: router must be 'fixed' with member 0, "
                f"got router={config.router!r}, member={config.member}"
            )
        router = FixedRouter(1)
    members = checkpoint_nets(state, path, "Victim")
    postprocessors = build_postprocessors(config.postprocessors, num_classes, input_shape)
    victim = Victim(members, router, input_shape, num_classes, postprocessors).eval()
    victim.trained_on = trained_on(state)
    return victim


#: The LightningModules whose checkpoints can be served (as their class names record them).
VICTIM_CLASSES = ("ClassifierModule", "EnsembleModule")


def _check_checkpoints_exist(config: VictimConfig) -> None:
    """Name every checkpoint ``config`` needs that does not exist, at once: a new user following a config for
    "EDM + Adaptive Misinformation" learns of all three trainings it needs, not of one per attempt.

    Post-processor checkpoints are the string arguments ending in ``.ckpt`` (a model of another suffix is checked
    when the post-processor loads it).

    Raises:
        CheckpointNotFoundError: one sentence per missing file, each with the command that trains it.
    """
    needed = [(config.checkpoint, "Victim", VICTIM_HINT)]
    if config.hash_checkpoint is not None and router_class(config.router).needs_hash_network:
        needed.append((config.hash_checkpoint, "Hash network", HASH_HINT))
    for post in config.postprocessors:
        for name, value in (post.get("init_args") or {}).items():
            if isinstance(value, (str, Path)) and str(value).endswith(".ckpt"):
                needed.append((value, f"{str(post['class_path']).rpartition('.')[2]}: {name}", None))
    missing = [missing_checkpoint_message(path, what, hint) for path, what, hint in needed if not Path(path).is_file()]
    if missing:
        raise CheckpointNotFoundError(" ".join(missing))
