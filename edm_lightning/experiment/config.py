"""The experiment's configuration: what is evaluated, and everything that can be checked before training.

Only what is experiment-level lives here (seeds, which attacks against which victims at which budgets,
the defense sweep, where things go); :func:`validate` refuses a configuration that cannot finish before
any stage starts.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from edm_lightning.data import get_spec
from edm_lightning.defense.postprocess import AdaptiveMisinformation, build_postprocessor, resolve_postprocessor
from edm_lightning.errors import ConfigError
from edm_lightning.models import OptimConfig

__all__ = [
    "AttackSpec",
    "ClusterSpec",
    "DefenseSpec",
    "EDMSpec",
    "ExperimentConfig",
    "HashNetSpec",
    "TrainSpec",
    "TrainerSpec",
    "averaging_attacks",
    "curve_attacks",
    "defense_label",
    "needs_misinformation",
    "postprocessor_specs",
    "validate",
]

ATTACKS = ("knockoff", "jbda", "jbda_tr", "dfme")


@dataclass
class TrainSpec:
    """How a classifier is trained.

    Args:
        arch: architecture (``lenet5``, ``resnet18``, ``vgg16_bn``).
        epochs: training epochs.
        batch_size: training batch size.
        train_size: use only this many training images (``None``: all).
        val_size: training images held out for validation (checkpoint selection).
        augment: random crop and flip (32x32 colour data).
        optim: optimiser and schedule.
    """

    arch: str = "lenet5"
    epochs: int = 10
    batch_size: int = 128
    train_size: int | None = None
    val_size: int = 5000
    augment: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class HashNetSpec(TrainSpec):
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
class EDMSpec(TrainSpec):
    """The EDM ensemble.

    Args:
        num_members: N.
        diversity_weight: lambda of the main comparison.
        tradeoff_weights: further lambdas, for the defender-vs-clone accuracy trade-off curve.
        ood_dataset: the defender's OOD set for the diversity term.
        routers: the routers EDM is served behind, each a defense of its own in the results: ``neural``
            (the paper's hash network) and ``keyed`` (keyed hash of the input bytes); the first is the
            main one (trade-off curve, routed validation accuracy).
        router_key: secret key of the keyed router.
    """

    num_members: int = 5
    diversity_weight: float = 0.5
    tradeoff_weights: list[float] = field(default_factory=list)
    ood_dataset: str = "animal-mnist"
    routers: list[Literal["neural", "keyed"]] = field(default_factory=lambda: ["neural", "keyed"])
    router_key: str = "edm-lightning"


@dataclass
class AttackSpec:
    """One attack, run against the undefended target and against EDM.

    Args:
        name: ``knockoff``, ``jbda``, ``jbda_tr`` or ``dfme``.
        budgets: query budgets (the largest is the one in the results table; several draw a curve).
        epochs: clone training epochs (KnockoffNets; JBDA: per round; DFME: epochs of ``steps_per_epoch``).
        surrogate: KnockoffNets' natural images (must differ from the defender's OOD set).
        arch: the clone's architecture.
        label_only: the victim answers top-1 labels only.
        options: further keyword arguments of the attack's ``run_*`` function (KnockoffNets' query
            averaging: ``query_copies``, ``copy_noise``, ``copy_shift``).
        label: its name in the results (default ``name``); needed when one attack is listed twice
            (``knockoff`` and ``knockoff-avg8``). Not part of the stage key: renaming reruns nothing.
    """

    name: Literal["knockoff", "jbda", "jbda_tr", "dfme"] = "knockoff"
    label: str | None = None
    budgets: list[int] = field(default_factory=lambda: [50_000])
    epochs: int = 10
    surrogate: str = "mnist"
    arch: str = "lenet5"
    label_only: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass
class DefenseSpec:
    """An output-perturbation defense (a post-processor), swept over its strength, alone and on EDM.

    Args:
        name: its name in the results (``reverse-sigmoid``); on EDM it reads ``edm-neural+reverse-sigmoid``.
        postprocessor: a class of :mod:`edm_lightning.defense.postprocess` (``ReverseSigmoid``) or a dotted path.
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
class TrainerSpec:
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
class ClusterSpec:
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
    results_dir: str = "results"
    wandb_project: str | None = "edm-lightning"
    target: TrainSpec = field(default_factory=TrainSpec)
    hashnet: HashNetSpec = field(default_factory=HashNetSpec)
    edm: EDMSpec = field(default_factory=EDMSpec)
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec()])
    defenses: list[DefenseSpec] = field(default_factory=list)
    misinformation: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=5))
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    dry_run: bool = False
    workers: int = 1
    executor: Literal["local", "slurm", "submitit_local"] = "local"
    cluster: ClusterSpec = field(default_factory=ClusterSpec)


def validate(config: ExperimentConfig, log=None) -> None:
    """Everything that can be checked before training starts: names, sizes, budgets, honesty of the setup."""
    log = log or sys.stderr
    spec = get_spec(config.dataset)
    get_spec(config.edm.ood_dataset)
    get_spec(config.hashnet.dataset)
    _validate_trainer(config)
    _validate_executor(config)
    if isinstance(config.workers, bool) or not isinstance(config.workers, int) or config.workers < 1:
        raise ConfigError(f"workers must be a positive integer (stages run at once), got {config.workers!r}")
    if not config.seeds:
        raise ConfigError("seeds must name at least one seed")
    trained = {"target": config.target, "hashnet": config.hashnet, "edm": config.edm, "misinformation": config.misinformation}
    trained |= {f"attack {attack.title}": attack for attack in config.attacks}
    for where, part in trained.items():
        if isinstance(part.epochs, bool) or not isinstance(part.epochs, int) or part.epochs < 1:
            raise ConfigError(f"{where}: epochs must be a positive integer, got {part.epochs!r}")
    if not config.attacks:
        raise ConfigError("attacks must name at least one attack")
    titles = [attack.title for attack in config.attacks]
    if len(set(titles)) != len(titles):
        raise ConfigError(f"attacks must have distinct labels (give a repeated attack a label), got {titles}")
    if not config.edm.routers or len(set(config.edm.routers)) != len(config.edm.routers):
        raise ConfigError(f"edm.routers must name each router once, got {config.edm.routers}")
    if config.edm.ood_dataset == config.dataset:
        raise ConfigError(f"edm.ood_dataset must differ from the in-distribution dataset {config.dataset!r}")
    for attack in config.attacks:
        if not attack.budgets or any(b <= 0 for b in attack.budgets):
            raise ConfigError(f"attack {attack.name}: budgets must be positive integers, got {attack.budgets}")
        batch = int(attack.options.get("batch_size", 256 if attack.name == "dfme" else 128))
        if min(attack.budgets) < batch:
            raise ConfigError(
                f"attack {attack.name}: budget {min(attack.budgets)} is smaller than one query batch ({batch}); "
                "raise the budget or lower options.batch_size"
            )
        if attack.name == "knockoff":
            surrogate = get_spec(attack.surrogate)
            if surrogate.input_shape[0] != spec.input_shape[0] and {surrogate.input_shape[0], spec.input_shape[0]} != {1, 3}:
                raise ConfigError(f"surrogate {attack.surrogate!r} cannot be converted to {spec.input_shape}")
            if attack.surrogate == config.edm.ood_dataset:
                message = (
                    f"WARNING: the attacker's surrogate set ({attack.surrogate!r}) is the defender's OOD set: EDM was "
                    "trained to disagree on exactly these queries, which makes the defense look better than it is."
                )
                warnings.warn(message, stacklevel=2)
                print(message, file=log, flush=True)
            if attack.surrogate == config.dataset:
                raise ConfigError(f"attack knockoff: the surrogate must not be the victim's own dataset {config.dataset!r}")
    _validate_defenses(config, titles)


def _validate_executor(config: ExperimentConfig) -> None:
    """The executor's own needs: the submitit package, a partition, sane resources."""
    if config.executor == "local":
        return
    if importlib.util.find_spec("submitit") is None:
        raise ConfigError(f"executor {config.executor!r} needs submitit: pip install 'edm-lightning[cluster]'")
    cluster = config.cluster
    if config.executor == "slurm" and not cluster.partition:
        raise ConfigError("executor 'slurm' needs cluster.partition (sinfo lists the partitions you may use)")
    for key in ("timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
        if getattr(cluster, key) < 1:
            raise ConfigError(f"cluster.{key} must be a positive integer, got {getattr(cluster, key)!r}")
    if cluster.gpus_per_task not in (0, 1):
        raise ConfigError(f"cluster.gpus_per_task must be 0 or 1 (a stage uses one device), got {cluster.gpus_per_task!r}")


def _validate_trainer(config: ExperimentConfig) -> None:
    """A device the machine has, checked before any stage starts (names are checked by the parser); more workers
    than GPUs share them in turn."""
    accelerator = config.trainer.accelerator
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"trainer.accelerator {accelerator!r}: this machine has no CUDA device; use cpu or auto")


def _validate_defenses(config: ExperimentConfig, attack_titles: list[str]) -> None:
    """Every defense must name known attacks and bases, and every strength must build (ranges checked now)."""
    spec = get_spec(config.dataset)
    bases = ["none"] + [f"edm-{router}" for router in config.edm.routers]
    names = [defense.name for defense in config.defenses]
    if len(set(names)) != len(names):
        raise ConfigError(f"defenses must have distinct names, got {names}")
    for defense in config.defenses:
        where = f"defense {defense.name!r}"
        if defense.name in bases or "+" in defense.name:
            raise ConfigError(f"{where}: the name must not be one of {bases} or contain '+'")
        if not defense.defends or not set(defense.defends) <= set(bases):
            raise ConfigError(f"{where}: defends must name what it is applied to, from {bases}, got {defense.defends}")
        if not set(defense.attacks) <= set(attack_titles):
            raise ConfigError(f"{where}: attacks {defense.attacks} must be labels of configured attacks {attack_titles}")
        if defense.strength is None and defense.values != [None]:
            raise ConfigError(f"{where}: values {defense.values} need a strength (the init argument they set)")
        if defense.strength is not None and (not defense.values or None in defense.values):
            raise ConfigError(f"{where}: strength {defense.strength!r} needs values (numbers), got {defense.values}")
        if defense.strength in defense.options:
            raise ConfigError(f"{where}: {defense.strength!r} is swept by values; remove it from options")
        # Adaptive Misinformation's model is trained later: a stand-in of the right shape lets its ranges be checked now.
        stand_in = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(spec.input_shape), spec.num_classes))
        for value in defense.values:  # out-of-range strengths fail here, not after hours of training
            post = postprocessor_specs(defense, value, {"checkpoint": stand_in})[0]
            build_postprocessor(post, spec.num_classes, spec.input_shape)


def curve_attacks(config: ExperimentConfig) -> list[str]:
    """Labels of the attacks with trade-off curves: the first attack and every attack a defense names."""
    return list(dict.fromkeys([config.attacks[0].title] + [title for d in config.defenses for title in d.attacks]))


def averaging_attacks(config: ExperimentConfig) -> list[AttackSpec]:
    return [a for a in config.attacks if a.name == "knockoff" and int(a.options.get("query_copies", 1)) > 1]


def defense_label(defense: DefenseSpec, base: str) -> str:
    return defense.name if base == "none" else f"{base}+{defense.name}"


def needs_misinformation(config: ExperimentConfig) -> bool:
    return any(is_adaptive_misinformation(d) and "misinformation_model" not in d.options for d in config.defenses)


def is_adaptive_misinformation(defense: DefenseSpec) -> bool:
    return resolve_postprocessor({"class_path": defense.postprocessor})[0] is AdaptiveMisinformation


def postprocessor_specs(defense: DefenseSpec, value: float | None, misinformation: dict | None) -> list[dict]:
    """The ``VictimConfig.postprocessors`` entry of ``defense`` at strength ``value``."""
    init_args = dict(defense.options)
    if defense.strength is not None:
        init_args[defense.strength] = value
    if is_adaptive_misinformation(defense) and "misinformation_model" not in init_args:
        init_args["misinformation_model"] = misinformation["checkpoint"]
    return [{"class_path": defense.postprocessor, "init_args": init_args}]
