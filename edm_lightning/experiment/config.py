"""The experiment's configuration: what is evaluated, where, and by which executor.

Only what is experiment-level lives here (seeds, which attacks against which victims at which budgets,
the defense sweep, where things go); :mod:`.validation` checks it before any stage starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from jsonargparse.typing import SecretStr

from edm_lightning.attacks import ATTACKS
from edm_lightning.command_line import default_of
from edm_lightning.data import ClassificationDataModule, EDMDataModule
from edm_lightning.defense.postprocessors import AdaptiveMisinformation, resolve_postprocessor
from edm_lightning.errors import ConfigError
from edm_lightning.models import ClassifierModule, EnsembleModule, OptimConfig
from edm_lightning.routing import RouterConfig, as_secret, plain_router, router_label

__all__ = [
    "AttackConfig",
    "BenignCorruption",
    "ClusterConfig",
    "DefenseConfig",
    "DetectorSetup",
    "EDMConfig",
    "ExperimentConfig",
    "HashNetConfig",
    "TrainConfig",
    "TrainerConfig",
    "averaging_attacks",
    "curve_attacks",
    "defense_label",
    "needs_misinformation",
    "postprocessor_configs",
    "stage_spec",
    "surrogate_attacks",
]


@dataclass
class TrainConfig:
    """How a classifier is trained.

    Args:
        arch: architecture (``lenet5``, ``resnet18``, ``vgg16_bn``).
        epochs: training epochs.
        batch_size: training batch size.
        train_size: use only this many training images (``None``: all).
        val_size: training images held out for validation (checkpoint selection).
        augment: random crop and flip (32x32 colour data).
        optim: optimiser and schedule.
        model: further init arguments of the stage's LightningModule, by the class's own names and defaults
            (``edm: {model: {temperature: 2.0}}`` for :class:`~edm_lightning.models.EnsembleModule`).
        data: further init arguments of its DataModule (``edm: {data: {ood_batch_size: 256}}``).
        trainer: further Trainer arguments (``{gradient_clip_val: 1.0}``); the device and precision are the
            experiment's ``trainer``, the epochs ``epochs``. Arguments the experiment sets itself are refused.
    """

    arch: str = default_of(ClassifierModule, "arch")  # the job classes' defaults: one value, one place
    epochs: int = 10
    batch_size: int = default_of(ClassificationDataModule, "batch_size")
    train_size: int | None = default_of(ClassificationDataModule, "train_size")
    val_size: int = default_of(ClassificationDataModule, "val_size")
    augment: bool = default_of(ClassificationDataModule, "augment")
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


#: The sections of a :class:`TrainConfig` that pass arguments through to the stage's job classes.
JOB_SECTIONS = ("model", "data", "trainer")


def stage_spec(settings: TrainConfig) -> dict[str, Any]:
    """``settings`` as a stage key holds it.

    Returns:
        Its fields as a dict, the pass-through sections only when they set something (so a stage planned before
        they existed keeps its key, and its results).
    """
    spec = asdict(settings)
    return {key: value for key, value in spec.items() if key not in JOB_SECTIONS or value}


@dataclass
class HashNetConfig(TrainConfig):
    """The neural router's hash network (trained on ``dataset``, balanced on the defender's own data).

    Args:
        dataset: its auxiliary training set (KMNIST in the paper; Animal-MNIST offline).
        arch: ``small_cnn`` by default: H runs on every query, and a LeNet-5 H cost as much as a member.
    """

    arch: str = "small_cnn"
    dataset: str = "animal-mnist"
    epochs: int = 5
    val_size: int = 1000


@dataclass
class EDMConfig(TrainConfig):
    """The EDM ensemble.

    Args:
        num_members: N.
        diversity_weight: lambda of the main comparison.
        tradeoff_weights: further lambdas, for the defender-vs-clone accuracy trade-off curve.
        ood_dataset: the defender's OOD set for the diversity term.
        routers: the routers EDM is served behind, each a defense of its own in the results (``edm-<label>``,
            :attr:`router_labels`): ``neural`` (the paper's hash network), ``keyed`` (keyed hash of the input bytes),
            ``coarse`` (keyed hash of a coarse view of the input) or any registered router, by name or with its own
            settings (``{class_path: coarse, init_args: {grid: 5}}``); the first is the main one (trade-off curve,
            routed validation accuracy).
        router_key: secret key of the keyed routers keyed, coarse and aligned
            (``None``: ``$EDM_ROUTER_KEY``, ``$EDM_ROUTER_KEY_FILE``, or
            the public default with a warning); written nowhere, shown as ``**********`` in printed configs.
    """

    num_members: int = default_of(EnsembleModule, "num_members")
    diversity_weight: float = default_of(EnsembleModule, "diversity_weight")
    tradeoff_weights: list[float] = field(default_factory=list)
    ood_dataset: str = default_of(EDMDataModule, "ood_dataset")
    routers: list[RouterConfig] = field(default_factory=lambda: ["neural", "keyed"])
    router_key: SecretStr | None = None

    def __post_init__(self) -> None:
        self.router_key = as_secret(self.router_key)  # a plain string from Python is hidden too (repr, logs)
        # plain data (names, or {class_path, init_args}) for stage keys; validate() names what is wrong with a router
        self.routers = [_plain(router) for router in self.routers]

    @property
    def router_labels(self) -> list[str]:
        """Each router's name in the results (:func:`~edm_lightning.routing.router_label`), in ``routers``' order."""
        return [router_label(router) for router in self.routers]


def _plain(router: Any) -> Any:
    try:
        return plain_router(router)
    except ConfigError:
        return router.as_dict() if isinstance(router, RouterConfig) else router


@dataclass
class AttackConfig:
    """One attack, run against the undefended target and against EDM.

    Args:
        name: a registered attack (:data:`~edm_lightning.attacks.ATTACKS`: ``knockoff``, ``jbda``, ``jbda_tr``,
            ``dfme``, ``maze``, and any attack registered with :func:`~edm_lightning.attacks.register_attack`).
        budgets: query budgets (the largest is the one in the results table; several draw a curve).
        epochs: clone training epochs (KnockoffNets; JBDA and ActiveThief: per round; DFME, MAZE: epochs of
            ``steps_per_epoch``): the argument the attack's entry names as its ``epochs_argument``.
        surrogate: the natural images an attack with a surrogate pool queries (KnockoffNets; it must differ from
            the defender's OOD set); unused by the others.
        arch: the clone's architecture.
        label_only: the victim answers top-1 labels only.
        options: further arguments of the attack's ``*_job`` function or of the class it forwards them to (its
            registry entry's ``forwards_to``), e.g. KnockoffNets' query averaging (``query_copies``,
            ``copy_noise``, ``copy_shift``: :attr:`averaging`) or MAZE's ``replay_steps``.
        label: its name in the results (default ``name``); needed when one attack is listed twice
            (``knockoff`` and ``knockoff-avg8``). Not part of the stage key: renaming reruns nothing.
    """

    name: str = "knockoff"
    label: str | None = None
    budgets: list[int] = field(default_factory=lambda: [50_000])
    epochs: int = 10
    surrogate: str = "mnist"
    arch: str = "lenet5"
    label_only: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The attack's name in tables: its ``label``, or its ``name``."""
        return self.label or self.name

    @property
    def averaging(self) -> dict[str, Any]:
        """Query averaging as ``options`` set it, defaults filled in from the attack's own signature:
        ``query_copies`` (1: none), ``copy_noise``, ``copy_shift`` (see :meth:`~edm_lightning.attacks.AttackEntry.averaging`).
        """
        return ATTACKS.get(self.name).averaging(self.options)


@dataclass
class DefenseConfig:
    """An output-perturbation defense (a post-processor), swept over its strength, alone and on EDM.

    Args:
        name: its name in the results (``reverse-sigmoid``); on EDM it reads ``edm-neural+reverse-sigmoid``.
        postprocessor: a name of :data:`~edm_lightning.defense.POSTPROCESSORS` (``ReverseSigmoid``) or a dotted path.
        strength: the init argument swept (``beta``); ``None`` for a defense without one (``TopLabel``).
        values: the strengths, weakest first.
        options: its other init arguments. ``AdaptiveMisinformation`` gets the experiment's own
            misinformation model (the ``misinformation`` stage) unless ``misinformation_model`` is given.
            (Not ``init_args``: jsonargparse reads a mapping with that key as a class to instantiate.)
        defends: what it is applied to: ``none`` (the undefended target: the defense alone) and/or
            ``edm-<router>`` (composed with the main EDM ensemble behind that router, the post-processor
            applied to the routed member's answer). Not called ``on``: YAML reads that key as ``True``.
        attacks: labels of the attacks run against it (default: the first attack), at their largest budget.
    """

    name: str
    postprocessor: str
    strength: str | None = None
    values: list[int | float | None] = field(default_factory=lambda: [None])
    options: dict[str, Any] = field(default_factory=dict)
    defends: list[str] = field(default_factory=lambda: ["none"])
    attacks: list[str] = field(default_factory=list)


@dataclass
class DetectorSetup:
    """A stateful detector beside victims (PRADA, :class:`~edm_lightning.defense.detectors.DetectorConfig`): every attack
    run against it is one client, and ``benign_clients`` streams of the defender's own test images measure how many
    honest clients it flags.

    Args:
        name: its name in the results (``prada``); on EDM it reads ``edm-neural+prada``.
        options: the detector's settings (``delta``, ``test_every``, ...; ``response`` is ``misinform`` here: a
            refused attack would end its stage without a clone to measure).
        defends: what it watches: ``none`` (the undefended target) and/or ``edm-<router>``, as a defense's ``defends``.
        attacks: labels of the attacks run against it, at every budget (default: every attack).
        benign_clients: benign clients, each streaming ``benign_queries`` test images in an order of its own (every
            other one mildly corrupted: Gaussian noise of std 0.02 and a shift of up to one pixel, as a camera sends).
        benign_queries: queries per benign client (at most the test set, so no benign client repeats an image).
    """

    name: str = "prada"
    options: dict[str, Any] = field(default_factory=dict)
    defends: list[str] = field(default_factory=lambda: ["none"])
    attacks: list[str] = field(default_factory=list)
    benign_clients: int = 20
    benign_queries: int = 10_000


@dataclass
class TrainerConfig:
    """Where every stage's Trainer runs (the runner always uses one device per stage; ``workers`` run stages at once).

    Args:
        accelerator: ``auto``, ``cpu``, ``gpu`` / ``cuda``, ``mps``.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``); ``None``: Lightning's default.
    """

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"] | None = None

    def options(self) -> dict[str, Any]:
        """The Trainer arguments."""
        return {"accelerator": self.accelerator, "devices": 1,
                **({"precision": self.precision} if self.precision is not None else {})}


@dataclass
class ClusterConfig:
    """Stages as submitit jobs (``executor: slurm``, or ``submitit_local`` to try the same path on this machine).

    Each level of the plan (the stages whose needs are done) is one job array; a job killed by
    pre-emption or its time limit is requeued and resumes from the stage's own files.

    Args:
        partition: the SLURM partition (required for ``slurm``).
        timeout_min: each job's time limit, in minutes.
        cpus_per_task: CPU cores per job (also its PyTorch threads).
        gpus_per_task: GPUs per job (0 or 1: every stage uses one device).
        mem_gb: memory per job.
        array_parallelism: jobs of one array running at once.
        additional: further ``#SBATCH`` options (``{account: myproject, qos: normal}``).
    """

    partition: str | None = None
    timeout_min: int = 240
    cpus_per_task: int = 8
    gpus_per_task: int = 0
    mem_gb: int = 32
    array_parallelism: int = 64
    additional: dict[str, str] = field(default_factory=dict)


@dataclass
class BenignCorruption:
    """The mild corruption a benign client's camera adds to a query: each served victim's accuracy is also measured on
    test images so corrupted (records' ``defender_acc_corrupted``), the benign cost of a defense beyond clean images.

    Args:
        noise: std of the Gaussian noise, in [0, 1] (images in [0, 1]).
        shift: largest shift, in pixels per axis, 0..8.
        seed: seed of the corruption, in [0, 2**32); each test image's is drawn from it and the image's place in the
            test set, so every victim is measured on the same corrupted images.
    """

    noise: float = 0.0
    shift: int = 0
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether any corruption is asked for (none: the figure is not measured)."""
        return self.noise > 0 or self.shift > 0


@dataclass
class ExperimentConfig:
    """One dataset's EDM evaluation.

    Args:
        name: experiment name (results go to ``<results_dir>/<name>/``).
        dataset: the defender's in-distribution dataset.
        root: data root.
        seeds: training and attack seeds; figures are mean and spread over them.
        test_size: evaluate on only the first this-many test images (``None``: all).
        runs_dir: where stages keep checkpoints, query caches and results.
        results_dir: where the results files go.
        wandb_project: W&B project; ``None`` logs nowhere but the files.
        target: the undefended target.
        hashnet: the neural router's hash network.
        edm: the EDM ensemble.
        attacks: the attacks.
        defenses: the published output-perturbation defenses, alone and composed with EDM.
        detectors: stateful detectors (PRADA) beside the target and EDM; each attack is one client.
        benign_corruption: also measure each victim's accuracy on test images so corrupted (e.g. noise std 0.02
            and shifts of up to 1 pixel: ``{noise: 0.02, shift: 1}``); the default (no noise, no shift) measures
            clean images only.
        misinformation: Adaptive Misinformation's misinformation model (trained only if a defense needs it).
        trainer: the device and precision of every stage's Trainer (not part of any stage's key: a stage
            run on a GPU is reused on a CPU and the other way round).
        dry_run: print the plan (every stage, whether it is already done, its estimated time) and exit.
        workers: stages run at once, each in a local process of its own with ``cores // workers`` PyTorch
            threads (or a GPU of its own); 1 runs them one after another in this process.
        executor: ``local`` (this process or ``workers`` local processes), ``slurm`` (submitit jobs, see
            ``cluster``) or ``submitit_local`` (submitit's local processes, ``workers`` at a time).
        cluster: the submitit jobs' resources.
    """

    name: str = "fashionmnist"
    dataset: str = "fashionmnist"
    root: str = "data"
    seeds: list[int] = field(default_factory=lambda: [0])
    test_size: int | None = None
    runs_dir: str = "runs/experiments"
    results_dir: str = "runs/results"
    wandb_project: str | None = "edm-lightning"
    target: TrainConfig = field(default_factory=TrainConfig)
    hashnet: HashNetConfig = field(default_factory=HashNetConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    attacks: list[AttackConfig] = field(default_factory=lambda: [AttackConfig()])
    defenses: list[DefenseConfig] = field(default_factory=list)
    detectors: list[DetectorSetup] = field(default_factory=list)
    benign_corruption: BenignCorruption = field(default_factory=BenignCorruption)
    misinformation: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dry_run: bool = False
    workers: int = 1
    executor: Literal["local", "slurm", "submitit_local"] = "local"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def curve_attacks(config: ExperimentConfig) -> list[str]:
    """Labels of the attacks with trade-off curves: the first attack and every attack a defense names."""
    return list(dict.fromkeys([config.attacks[0].title] + [title for d in config.defenses for title in d.attacks]))


def averaging_attacks(config: ExperimentConfig) -> list[AttackConfig]:
    """The attacks that average the answers to several perturbed copies of each query (EDM's adaptive attacker)."""
    return [a for a in config.attacks if a.averaging["query_copies"] > 1]


def surrogate_attacks(config: ExperimentConfig) -> list[AttackConfig]:
    """The attacks that query natural images of another dataset (their ``surrogate``), in config order."""
    return [a for a in config.attacks if ATTACKS.get(a.name).surrogate_pool]


def detector_attacks(config: ExperimentConfig, setup: DetectorSetup) -> list[AttackConfig]:
    """The attacks run against a detector's victims (its ``attacks``, or every attack)."""
    return [a for a in config.attacks if not setup.attacks or a.title in setup.attacks]


def defense_label(defense: DefenseConfig | DetectorSetup, base: str) -> str:
    """The table row name of ``defense`` on ``base`` (``none``: the defense alone; else ``base+defense``)."""
    return defense.name if base == "none" else f"{base}+{defense.name}"


def needs_misinformation(config: ExperimentConfig) -> bool:
    """Whether a defense needs the experiment to train a misinformation model (none was given)."""
    return any(is_adaptive_misinformation(d) and "misinformation_model" not in d.options for d in config.defenses)


def is_adaptive_misinformation(defense: DefenseConfig) -> bool:
    return resolve_postprocessor({"class_path": defense.postprocessor})[0] is AdaptiveMisinformation


def postprocessor_configs(defense: DefenseConfig, value: float | None, misinformation: dict | None) -> list[dict]:
    """The ``VictimConfig.postprocessors`` entry of ``defense`` at strength ``value``."""
    init_args = dict(defense.options)
    if defense.strength is not None:
        init_args[defense.strength] = value
    if is_adaptive_misinformation(defense) and "misinformation_model" not in init_args:
        init_args["misinformation_model"] = misinformation["checkpoint"]
    return [{"class_path": defense.postprocessor, "init_args": init_args}]
