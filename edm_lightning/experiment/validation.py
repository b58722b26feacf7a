"""Everything about an experiment's configuration that can be checked before any stage starts.

:func:`validate` refuses names, sizes, budgets, devices and executors that could not finish, and flags a
setup that would flatter the defense, so a bad configuration costs seconds, not hours of training. A value a
stage's own classes would refuse is refused here by the same checks: each stage's parts (training modules, attack
modules against a stand-in victim, routers) are built on the meta device, without data, weights or queries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator

import torch
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value

from edm_lightning.attacks import ATTACKS
from edm_lightning.attacks.oracle import check_budget_covers_batch
from edm_lightning.cli import Trainer
from edm_lightning.command_line import arguments_of, check_argument_values, refuse_nan
from edm_lightning.data import get_spec, open_dataset, require_fetched
from edm_lightning.data.datamodules import LINKED_ARGUMENTS, check_split_sizes
from edm_lightning.data.images import check_convertible
from edm_lightning.data.perturbations import check_corruption
from edm_lightning.defense import Victim
from edm_lightning.defense.detectors import DetectorConfig
from edm_lightning.defense.postprocessors import build_postprocessor, resolve_postprocessor
from edm_lightning.defense.postprocessors.base import LINKED
from edm_lightning.errors import ConfigError
from edm_lightning.experiment.config import (
    JOB_SECTIONS,
    AttackConfig,
    DefenseConfig,
    DetectorSetup,
    ExperimentConfig,
    TrainConfig,
    needs_misinformation,
    postprocessor_configs,
    surrogate_attacks,
)
from edm_lightning.experiment.jobs import (
    SET_BY_EXPERIMENT,
    TRAINING_JOBS,
    attack_job,
    check_attack_options,
    training_arguments,
    transfer_dir,
)
from edm_lightning.models.ensemble import check_ensemble_settings
from edm_lightning.nets import build_net
from edm_lightning.routing import FixedRouter, build_router, router_class, router_label

__all__ = ["validate"]


def validate(config: ExperimentConfig, log=None, check_data: bool = True) -> None:
    """Everything that can be checked before training starts: names, sizes, budgets, honesty of the setup.

    ``check_data=False`` skips opening the datasets (for checking a config on a machine without them).

    Raises:
        ConfigError: the first thing found wrong, with what was expected.
    """
    log = log or sys.stderr
    refuse_nan(config)  # whatever section it is in, and whatever the stage's class would make of it
    spec = get_spec(config.dataset)
    get_spec(config.edm.ood_dataset)
    get_spec(config.hashnet.dataset)
    _validate_trainer(config)
    _validate_executor(config)
    if isinstance(config.workers, bool) or not isinstance(config.workers, int) or config.workers < 1:
        raise ConfigError(f"workers must be a positive integer (stages run at once), got {config.workers!r}")
    if not config.seeds:
        raise ConfigError("seeds must name at least one seed")
    _validate_seeds(config.seeds)
    corruption = config.benign_corruption
    check_corruption(corruption.noise, corruption.shift, ("benign_corruption.noise", "benign_corruption.shift"))
    if isinstance(corruption.seed, bool) or not isinstance(corruption.seed, int) or not 0 <= corruption.seed < 2**32:
        raise ConfigError(f"benign_corruption.seed must be a whole number in [0, 2**32), got {corruption.seed!r}")
    trained = {"target": config.target, "hashnet": config.hashnet, "edm": config.edm, "misinformation": config.misinformation}
    for where, part in trained.items():
        _validate_job_sections(where, part)
    trained |= {f"attack {attack.title}": attack for attack in config.attacks}
    for where, part in trained.items():
        if isinstance(part.epochs, bool) or not isinstance(part.epochs, int) or part.epochs < 1:
            raise ConfigError(f"{where}: epochs must be a positive integer, got {part.epochs!r}")
        shape = get_spec(config.hashnet.dataset if where == "hashnet" else config.dataset).input_shape
        try:  # an unknown architecture, or one that cannot take these inputs, fails now rather than after training
            with _building():
                build_net(part.arch, shape, 10)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    for weight in [config.edm.diversity_weight, *config.edm.tradeoff_weights]:  # the ensemble module's own check
        try:
            check_ensemble_settings(config.edm.num_members, weight)
        except ConfigError as err:
            raise ConfigError(f"edm: {err}") from None
    if check_data:
        _validate_data(config)
    if not config.attacks:
        raise ConfigError("attacks must name at least one attack")
    titles = [attack.title for attack in config.attacks]
    if len(set(titles)) != len(titles):
        raise ConfigError(f"attacks must have distinct labels (give a repeated attack a label), got {titles}")
    try:  # an unknown router, or init_args it does not take, fail here
        labels = config.edm.router_labels
    except ConfigError as err:
        raise ConfigError(f"edm.routers: {err}") from None
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"edm.routers must name each router once, got {labels}")
    _validate_routers(config)
    if config.edm.ood_dataset == config.dataset:
        raise ConfigError(f"edm.ood_dataset must differ from the in-distribution dataset {config.dataset!r}")
    for attack in config.attacks:
        entry = ATTACKS.get(attack.name)  # an unregistered name fails here, with the registered ones listed
        where = f"attack {attack.title}"
        if not attack.budgets or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in attack.budgets):
            raise ConfigError(f"{where}: budgets must be positive integers, got {attack.budgets}")
        batch = int(attack.options.get("batch_size", entry.default("batch_size")))
        check_budget_covers_batch(min(attack.budgets), batch, where=f"{where} (options.batch_size): ")
        check_attack_options(attack)  # a misspelt option fails now, not after training
        for budget in attack.budgets:  # the attack's own check of what it would refuse at this budget
            try:
                entry.check(budget, attack.options)
            except ConfigError as err:
                raise ConfigError(f"{where} (budget {budget}): {err}") from None
        _validate_attack_parts(config, attack)
        if entry.surrogate_pool:
            check_convertible(get_spec(attack.surrogate).input_shape[0], spec.input_shape[0],
                              f"{where}: surrogate {attack.surrogate!r} images")
            if attack.surrogate == config.edm.ood_dataset:
                message = (
                    f"WARNING: the attacker's surrogate set ({attack.surrogate!r}) is the defender's OOD set: EDM was "
                    "trained to disagree on exactly these queries, which makes the defense look better than it is."
                )
                warnings.warn(message, stacklevel=2)
                print(message, file=log, flush=True)
            if attack.surrogate == config.dataset:
                raise ConfigError(f"{where}: the surrogate must not be the victim's own dataset {config.dataset!r}")
    _validate_defenses(config, titles)
    _validate_detectors(config, titles)
    _validate_training_parts(config)


def _validate_job_sections(where: str, settings: TrainConfig) -> None:
    """A training stage's ``model`` / ``data`` / ``trainer`` sections may set only arguments its classes take and the
    experiment does not set itself, to values of the types those take.

    Raises:
        ConfigError: a section that is not a mapping, an argument it may not set (the message lists those it may), or
            a value of the wrong type.
    """
    classes = dict(zip(("model", "data"), TRAINING_JOBS[where], strict=True)) | {"trainer": Trainer}
    for section in JOB_SECTIONS:
        given = getattr(settings, section)
        if not isinstance(given, dict):
            raise ConfigError(f"{where}.{section} must be a mapping of {classes[section].__name__} arguments, got {given!r}")
        takes = arguments_of(classes[section]) - SET_BY_EXPERIMENT[section]
        wrong = sorted(set(given) - takes)
        if wrong:
            set_here = sorted(set(wrong) & SET_BY_EXPERIMENT[section])
            reason = (f" ({', '.join(set_here)}: set by the experiment, e.g. {where}.epochs, trainer.accelerator)"
                      if set_here else "")
            raise ConfigError(f"{where}.{section}: {wrong} are not {classes[section].__name__} arguments it may set{reason}; "
                              f"it may set: {', '.join(sorted(takes))}")
        check_argument_values(classes[section], given, f"{where}.{section}")


def _validate_training_parts(config: ExperimentConfig) -> None:
    """Build each training stage's LightningModule and DataModule with the arguments the stage gives them, so every
    value their own checks refuse (``batch_size: 0``, ``test_size: -5``, ``edm.model.temperature: 0`` ...) is refused
    now, by those checks. Nothing is read or trained: the datasets are opened in ``setup``.

    Raises:
        ConfigError: a value the stage's classes refuse, naming the stage.
    """
    kinds = ["target", "edm"] + (["misinformation"] if needs_misinformation(config) else [])
    if any(router_class(router).needs_hash_network for router in config.edm.routers):
        kinds.insert(1, "hashnet")
    for kind in kinds:
        model, data = training_arguments(config, kind, config.edm.diversity_weight, hash_checkpoint=_NOT_YET_TRAINED)
        if kind == "edm":  # the key is checked against its fingerprint when the stage runs, with the key in its environment
            model["router_key_fingerprint"] = None
        model_class, data_class = TRAINING_JOBS[kind]
        with _refused_as(kind), _building():
            datamodule = data_class(**data)
            model_class(**model, **_linked(datamodule))


def _validate_attack_parts(config: ExperimentConfig, attack: AttackConfig) -> None:
    """Build the attack's DataModule and LightningModule as each of its stages builds them, against a stand-in victim of
    the dataset's shape: every option their own checks refuse (``query_copies: 0``, ``copy_noise: .nan``,
    ``steps_per_epoch: 0`` ...) is refused now, not after the victims have trained. Nothing is read or bought.

    Raises:
        ConfigError: a value the attack refuses at one of its budgets, naming the attack and the budget.
    """
    spec = get_spec(config.dataset)
    stand_in = Victim([torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(spec.input_shape), spec.num_classes))],
                      FixedRouter(1), spec.input_shape, spec.num_classes)
    for budget in sorted(set(attack.budgets)):
        with _refused_as(f"attack {attack.title} (budget {budget})"), _building():
            job = attack_job(config, attack, stand_in, budget, config.seeds[0], transfer_dir(config))
            datamodule = job.datamodule(**job.data_args)  # AttackJob.build without its seeding
            job.module(**job.module_args, **_linked(datamodule))


@contextlib.contextmanager
def _building() -> Iterator[None]:
    """Build a stage's parts for their checks alone: weights on the meta device (no memory, no initialisation: a
    VGG ensemble costs milliseconds), and the random state the stages seed themselves left as it was.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        yield


def _linked(datamodule) -> dict:
    """What the CLI links from a stage's DataModule into its LightningModule (class count, input shape, normalisation)."""
    return {key: getattr(datamodule, key) for key in LINKED_ARGUMENTS}


#: Stands for a hash network the plan trains before the ensemble: its classes only check that one is named.
_NOT_YET_TRAINED = "<the hash network the plan trains>"


def _validate_routers(config: ExperimentConfig) -> None:
    """Build every router the plan serves EDM behind (but the neural one, whose hash network is trained first) with a
    stand-in key, so settings the router refuses (``coarse`` with ``grid: 0``) are refused now.

    Raises:
        ConfigError: a setting a router refuses, naming it.
    """
    spec = get_spec(config.dataset)
    for router in config.edm.routers:
        if not router_class(router).needs_hash_network:
            with _refused_as(f"edm.routers: {router_label(router)}"):
                build_router(router, config.edm.num_members, key=secrets.token_hex(32), input_shape=spec.input_shape)


def _validate_seeds(seeds: list[int]) -> None:
    """Every seed must be one Lightning's ``seed_everything`` takes (each stage starts with it).

    Raises:
        ConfigError: a seed that is not a whole number in its bounds.
    """
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not min_seed_value <= seed <= max_seed_value:
            raise ConfigError(f"seeds must be whole numbers in [{min_seed_value}, {max_seed_value}] (what each stage seeds "
                              f"with), got {seed!r}")


@contextlib.contextmanager
def _refused_as(where: str) -> Iterator[None]:
    """A value a stage's class refuses (its ``ConfigError``, or the ``ValueError`` of a range check), as a
    ``ConfigError`` naming ``where``.

    Raises:
        ConfigError: what the class refused, naming ``where``.
    """
    try:
        yield
    except ValueError as err:  # ConfigError is one
        raise ConfigError(f"{where}: {err}") from None


def _validate_data(config: ExperimentConfig) -> None:
    """Every dataset the plan reads must be fetched (and unchanged) before the first stage starts."""
    needed = {config.dataset, config.edm.ood_dataset, config.hashnet.dataset}
    needed |= {attack.surrogate for attack in surrogate_attacks(config)}
    require_fetched(sorted(needed), config.root)  # every missing one named, with the command that fetches them
    parts = {"target": (config.target, config.dataset), "hashnet": (config.hashnet, config.hashnet.dataset),
             "edm": (config.edm, config.dataset)}
    if needs_misinformation(config):
        parts["misinformation"] = (config.misinformation, config.dataset)
    for where, (part, dataset) in parts.items():  # the split each training stage's DataModule will make
        with _refused_as(where):
            check_split_sizes(len(open_dataset(dataset, config.root, train=True)), part.val_size, part.train_size)


def _validate_executor(config: ExperimentConfig) -> None:
    """The executor's own needs: the submitit package, a partition, sane resources."""
    if config.executor == "local":
        return
    if importlib.util.find_spec("submitit") is None:
        raise ConfigError(f"executor {config.executor!r} needs submitit: pip install 'edm-lightning[cluster]'")
    cluster = config.cluster
    if config.executor == "slurm" and not cluster.partition:
        raise ConfigError("executor 'slurm' needs cluster.partition (sinfo lists the partitions you may use)")
    if config.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor 'slurm' needs SLURM's sbatch on this machine: run the experiment on a login node "
                          "of the cluster (executor submitit_local runs the same path on this machine)")
    for key in ("timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"):
        if getattr(cluster, key) < 1:
            raise ConfigError(f"cluster.{key} must be a positive integer, got {getattr(cluster, key)!r}")
    if cluster.gpus_per_task not in (0, 1):
        raise ConfigError(f"cluster.gpus_per_task must be 0 or 1 (a stage uses one device), got {cluster.gpus_per_task!r}")


def _validate_trainer(config: ExperimentConfig) -> None:
    """A device the machine has, checked before any stage starts (names are checked by the parser); more workers
    than GPUs share them in turn.

    Raises:
        ConfigError: the accelerator or device count is not available here.
    """
    accelerator = config.trainer.accelerator
    available = {
        "gpu": torch.cuda.is_available, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available,
        "tpu": lambda: importlib.util.find_spec("torch_xla") is not None,
    }
    if accelerator in available and not available[accelerator]():
        raise ConfigError(f"trainer.accelerator {accelerator!r}: this machine has no such device; use cpu or auto")


def _validate_defenses(config: ExperimentConfig, attack_titles: list[str]) -> None:
    """Every defense must name known attacks and bases, its options must be arguments of its post-processor of the
    types they take, and every strength must build (ranges checked now).

    Raises:
        ConfigError: the first thing found wrong, naming the defense.
    """
    spec = get_spec(config.dataset)
    bases = ["none"] + [f"edm-{router}" for router in config.edm.router_labels]
    names = [defense.name for defense in config.defenses]
    if len(set(names)) != len(names):
        raise ConfigError(f"defenses must have distinct names, got {names}")
    for defense in config.defenses:
        where = f"defense {defense.name!r}"
        _check_placement(where, defense, bases, attack_titles, "what it is applied to")
        if defense.strength is None and defense.values != [None]:
            raise ConfigError(f"{where}: values {defense.values} need a strength (the init argument they set)")
        if defense.strength is not None and (not defense.values or None in defense.values):
            raise ConfigError(f"{where}: strength {defense.strength!r} needs values (numbers), got {defense.values}")
        if defense.strength in defense.options:
            raise ConfigError(f"{where}: {defense.strength!r} is swept by values; remove it from options")
        try:
            post = resolve_postprocessor({"class_path": defense.postprocessor})[0]
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        settable = arguments_of(post) - set(LINKED) - {defense.strength}  # the victim's shapes; the swept strength
        check_argument_values(post, defense.options, f"{where}: options", settable)
        # Adaptive Misinformation's model is trained later: a stand-in of the right shape lets its ranges be checked now.
        stand_in = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(spec.input_shape), spec.num_classes))
        for value in defense.values:  # out-of-range strengths fail here, not after hours of training
            post = postprocessor_configs(defense, value, {"checkpoint": stand_in})[0]
            build_postprocessor(post, spec.num_classes, spec.input_shape)


def _validate_detectors(config: ExperimentConfig, attack_titles: list[str]) -> None:
    """Every detector must have a name of its own, known bases and attacks, settings PRADA takes, the ``misinform``
    response (a refused attack leaves no clone to measure) and benign clients the test set can feed.

    Raises:
        ConfigError: the first thing found wrong, naming the detector.
    """
    bases = ["none"] + [f"edm-{router}" for router in config.edm.router_labels]
    names = [setup.name for setup in config.detectors]
    if len(set(names)) != len(names) or set(names) & {d.name for d in config.defenses}:
        raise ConfigError(f"detectors must have names distinct from each other and from the defenses, got {names}")
    test_images = config.test_size or {"svhn": 26_032, "emnist-letters": 20_800}.get(config.dataset, 10_000)
    for setup in config.detectors:
        where = f"detector {setup.name!r}"
        _check_placement(where, setup, bases, attack_titles, "what it watches")
        unknown = set(setup.options) - set(DetectorConfig.__dataclass_fields__) - {"response"} | (set(setup.options) & {"state"})
        if unknown:
            raise ConfigError(f"{where}: unknown options {sorted(unknown)}; its settings: "
                              f"{', '.join(k for k in DetectorConfig.__dataclass_fields__ if k not in ('state', 'response'))}")
        if setup.options.get("response", "misinform") != "misinform":
            raise ConfigError(f"{where}: the experiment measures a detector's response 'misinform' (a refused attack "
                              f"leaves no clone to measure), got response {setup.options['response']!r}")
        DetectorConfig(**setup.options)  # ranges
        for key in ("benign_clients", "benign_queries"):
            value = getattr(setup, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
        if setup.benign_queries > test_images:
            raise ConfigError(f"{where}: benign_queries={setup.benign_queries} is more than the {test_images} test images "
                              "a benign client streams (each at most once); lower it")


def _check_placement(where: str, defense: DefenseConfig | DetectorSetup, bases: list[str], attack_titles: list[str],
                     defends: str) -> None:
    """A defense's or detector's name, the victims it ``defends`` and the attacks it lists must fit the experiment.

    Raises:
        ConfigError: a name that is a base or holds '+', an unknown base or none, an attack label not configured.
    """
    if defense.name in bases or "+" in defense.name:
        raise ConfigError(f"{where}: the name must not be one of {bases} or contain '+'")
    if not defense.defends or not set(defense.defends) <= set(bases):
        raise ConfigError(f"{where}: defends must name {defends}, from {bases}, got {defense.defends}")
    if not set(defense.attacks) <= set(attack_titles):
        raise ConfigError(f"{where}: attacks {defense.attacks} must be labels of configured attacks {attack_titles}")
