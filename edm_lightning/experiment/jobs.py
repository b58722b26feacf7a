"""The work of each stage kind: train a model, run an attack, measure a victim, in a stage folder.

Every stage is a LightningCLI job: it writes its complete config to ``<stage>/config.yaml`` and runs it through
the same CLI as ``python main.py`` (in this process), so that file reproduces the stage alone (its header says
how): training and attack stages are ``fit`` jobs, measurement stages (served accuracy, diagnostics, routing
spread) ``test`` jobs of the trained victim. Each function takes the experiment's configuration and the stage's
own parameters, works in ``folder`` and returns the stage's figures as a JSON-able dict (the stage's
``result.json``). They know nothing of caching or ordering: :mod:`.plan` decides what runs, :mod:`.execution` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from edm_lightning.attacks import ATTACKS, AttackJob, attack_figures
from edm_lightning.cli import JobRun
from edm_lightning.command_line import class_config
from edm_lightning.data import ClassificationDataModule, EDMDataModule, ProbeDataModule, get_spec
from edm_lightning.data.images import load_images
from edm_lightning.defense import CopySpreadModule, DiagnosticsModule, ServedVictimModule, VictimConfig, detectors
from edm_lightning.defense.detectors import DetectorConfig
from edm_lightning.errors import ConfigError
from edm_lightning.experiment.cli_jobs import run_stage_job, trainer_config
from edm_lightning.experiment.config import AttackConfig, ExperimentConfig, TrainConfig
from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule
from edm_lightning.models.hashnet import HashBalanceCallback
from edm_lightning.progress import EpochLines, interactive
from edm_lightning.routing import key_fingerprint, router_class
from edm_lightning.seeding import ReseedOnFit

__all__ = ["attack", "attack_job", "diagnostics", "routing_spread", "served_accuracy", "train_edm", "train_hashnet",
           "train_misinformation", "train_target", "training_arguments", "victim_config"]


#: Each training stage's LightningModule and DataModule: the classes its ``config.yaml`` names.
TRAINING_JOBS: dict[str, tuple[type, type]] = {
    "target": (ClassifierModule, ClassificationDataModule),
    "hashnet": (ClassifierModule, ClassificationDataModule),
    "edm": (EnsembleModule, EDMDataModule),
    "misinformation": (MisinformationModule, ClassificationDataModule),
}

#: What the runner reads back from each stage kind's ``result.json`` (besides ``stage_wall_time_s``): a finished stage
#: whose result lacks one, or holds other than a finite number (or a list of them) there, is damaged and runs again.
RESULT_FIGURES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(TRAINING_JOBS, ("test_acc",)),
    "served": ("test_acc",),
    "attack": ("clone_acc", "agreement", "queries", "wall_time_s"),
    "diagnostics": ("share_test", "coherence_id", "coherence_ood", "coherence_edges"),
    "spread": ("distinct_members", "distinct_if_random", "share_on_plain_member"),
    "benign": ("benign_clients", "benign_flagged", "benign_w_min"),
}

#: The files each stage kind leaves in its folder: a training stage's ``best.ckpt`` (which later stages read) and
#: ``last.ckpt`` (where its ``config.yaml`` resumes), an attack's clone (``last.ckpt``, what its ``config.yaml``
#: tests). A finished stage is whole only while they are the files it wrote; a damaged one runs again without them
#: (so it trains afresh, not "resumes" a finished fit; an attack keeps what it bought).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {**dict.fromkeys(TRAINING_JOBS, ("best.ckpt", "last.ckpt")),
                                             "attack": ("last.ckpt",)}

#: What the experiment sets in every training job itself (from its schema, the CLI's links, or how stages run);
#: a stage's ``model`` / ``data`` / ``trainer`` pass-through section may set any other argument of the class.
SET_BY_EXPERIMENT: dict[str, frozenset[str]] = {
    "model": frozenset({"arch", "optim", "num_members", "diversity_weight", "router", "router_key", "hash_checkpoint",
                        "router_key_fingerprint", "num_classes", "input_shape", "mean", "std"}),
    "data": frozenset({"dataset", "ood_dataset", "root", "batch_size", "val_size", "train_size", "test_size", "augment"}),
    # one device per stage (workers run stages at once); strategy and nodes would make an in-process stage relaunch
    # the runner itself in every DDP process
    "trainer": frozenset({"max_epochs", "accelerator", "devices", "precision", "strategy", "num_nodes", "logger",
                          "default_root_dir", "callbacks", "enable_checkpointing", "enable_progress_bar",
                          "enable_model_summary", "fast_dev_run", "barebones"}),  # the last two: no checkpoint, no log
}


def training_arguments(config: ExperimentConfig, kind: str, weight: float | None = None,
                       hash_checkpoint: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The init arguments a training stage gives its LightningModule and DataModule (:data:`TRAINING_JOBS`).

    Args:
        config: the experiment.
        kind: ``target``, ``hashnet``, ``edm`` or ``misinformation``.
        weight: the ensemble's diversity weight (``edm``).
        hash_checkpoint: the neural router's hash network (``edm``).

    Returns:
        ``(model arguments, data arguments)``, as Python values.
    """
    settings: TrainConfig = getattr(config, kind)
    model = {"arch": settings.arch, "optim": settings.optim}
    dataset = config.hashnet.dataset if kind == "hashnet" else config.dataset
    data = {"dataset": dataset, "root": config.root, "batch_size": settings.batch_size, "val_size": settings.val_size,
            "train_size": settings.train_size, "test_size": None if kind == "hashnet" else config.test_size,
            "augment": settings.augment}
    if kind == "edm":
        router = config.edm.routers[0]
        model |= {"num_members": config.edm.num_members, "diversity_weight": weight, "router": router,
                  "router_key": None,  # the key: from the environment, checked by its fingerprint
                  "router_key_fingerprint": _fingerprint(config, router), "hash_checkpoint": hash_checkpoint}
        data |= {"ood_dataset": config.edm.ood_dataset}
    return model | settings.model, data | settings.data


def train_target(config: ExperimentConfig, folder: Path, seed: int) -> dict:
    """The undefended target: its best checkpoint and test accuracy."""
    run = _fit_and_test(config, folder, seed, "target", config.target, *_training_configs(config, "target"))
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": run.metrics["test/acc"]}


def train_hashnet(config: ExperimentConfig, folder: Path, seed: int) -> dict:
    """The neural router's hash network, trained on ``hashnet.dataset`` and balanced on the defender's data."""
    settings = config.hashnet
    shape, target_shape = get_spec(settings.dataset).input_shape, get_spec(config.dataset).input_shape
    if tuple(shape) != tuple(target_shape):
        raise ConfigError(f"hashnet.dataset {settings.dataset!r} has shape {shape}, the target {target_shape}")
    balance = class_config(HashBalanceCallback, {"dataset": config.dataset, "root": config.root})
    run = _fit_and_test(config, folder, seed, "hashnet", settings, *_training_configs(config, "hashnet"), callbacks=[balance])
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": run.metrics["test/acc"]}


def train_edm(config: ExperimentConfig, folder: Path, seed: int, weight: float, hash_checkpoint: str | None) -> dict:
    """One EDM ensemble at diversity weight ``weight``: routed accuracy, coherence, members' shares."""
    parts = _training_configs(config, "edm", weight, hash_checkpoint)
    metrics = _fit_and_test(config, folder, seed, "ensemble", config.edm, *parts).metrics
    keep = ("test/acc", "test/id/coherence", "test/ood/coherence", "test/id/coherent_share", "test/ood/coherent_share")
    shares = {k: v for k, v in metrics.items() if k.startswith("test/member_")}
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"], "hash_checkpoint": hash_checkpoint,
            **{k.removeprefix("test/"): metrics[k] for k in keep if k in metrics},
            **{k.removeprefix("test/"): v for k, v in shares.items()}}


def train_misinformation(config: ExperimentConfig, folder: Path, seed: int) -> dict:
    """Adaptive Misinformation's misinformation model: trained on the defender's data to be confidently wrong."""
    run = _fit_and_test(config, folder, seed, "misinformation", config.misinformation,
                        *_training_configs(config, "misinformation"), monitor=("val/loss", "min"))
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": run.metrics["test/acc"]}


def _training_configs(config: ExperimentConfig, kind: str, weight: float | None = None,
                      hash_checkpoint: str | None = None) -> tuple[dict, dict]:
    """:func:`training_arguments` as the ``model`` and ``data`` sections of the stage's config."""
    model, data = training_arguments(config, kind, weight, hash_checkpoint)
    model_class, data_class = TRAINING_JOBS[kind]
    return class_config(model_class, model), class_config(data_class, data)


def _fit_and_test(config: ExperimentConfig, folder: Path, seed: int, job_type: str, settings: TrainConfig, model: dict,
                  data: dict, callbacks: list[dict] = (), monitor: tuple[str, str] = ("val/acc", "max")) -> JobRun:
    """Fit ``settings.epochs`` (resuming from ``last.ckpt`` if an earlier run was killed; ``settings.trainer`` adds
    Trainer arguments), then test the best checkpoint by ``monitor``.

    Lightning's own bar when standard error is a terminal, one line per epoch when it is not.

    Returns:
        The finished job (its test metrics over all test loaders).
    """
    checkpoint = class_config(ModelCheckpoint, {
        "dirpath": str(folder), "filename": "best", "monitor": monitor[0], "mode": monitor[1], "save_last": True,
        "enable_version_counter": False})  # a resumed stage replaces best.ckpt, never best-v1.ckpt
    bar = interactive()
    lines = [] if bar else [class_config(EpochLines, {})]
    # The checkpoint callback comes last so `--trainer.callbacks.dirpath DIR` moves it (the stage header's recipe for a
    # re-run that leaves this stage alone); Lightning runs checkpoint callbacks last wherever they are listed.
    trainer = trainer_config(config, folder, seed, job_type, settings.epochs,
                             [*callbacks, *lines, class_config(ReseedOnFit, {}), checkpoint])
    job = {"seed_everything": seed, "trainer": trainer | {"enable_progress_bar": bar, **settings.trainer}, "model": model,
           "data": data}
    last = folder / "last.ckpt"
    return run_stage_job(config, folder, job, tested="best.ckpt", resume=str(last) if last.is_file() else None,
                         test_checkpoint="best")


def served_accuracy(config: ExperimentConfig, folder: Path, victim: dict, corruption: dict | None = None) -> dict:
    """The defender's accuracy as served (router and post-processors on), on the test set, or on it corrupted as
    ``corruption`` says (:class:`~edm_lightning.experiment.config.BenignCorruption` as a dict).

    A ``main.py test`` job of :class:`~edm_lightning.defense.ServedVictimModule`, batches of 1024 images.

    Returns:
        ``test_acc``: correct answers over test images.
    """
    data = class_config(ClassificationDataModule, {"dataset": config.dataset, "root": config.root, "batch_size": 1024,
                                                   "test_size": config.test_size})
    model = class_config(ServedVictimModule, {"victim": victim_config(config, victim), **(corruption or {})})
    run = _probe(config, folder, "served", model, data)
    return {"test_acc": run.model.tested_accuracy}


def benign_clients(config: ExperimentConfig, folder: Path, victim: dict, clients: int, queries: int, seed: int) -> dict:
    """How many honest clients the victim's detector flags (:func:`~edm_lightning.defense.detectors.benign_clients`),
    each streaming the defender's test images. Run in this process (a sequential stream per client, no training).

    Returns:
        ``benign_clients``, ``benign_flagged``, ``benign_fpr``, ``benign_flagged_at``, ``benign_w_min``.
    """
    served = victim_config(config, {**victim, "detector": None})
    images, _ = load_images(config.dataset, config.root, train=False)
    images = images[: config.test_size].float().div_(255)
    settings = DetectorConfig(**victim["detector"]).prada()
    return detectors.benign_clients(served.build(), images, settings, clients, min(queries, len(images)), seed)


def diagnostics(config: ExperimentConfig, folder: Path, victim: dict, surrogate: str | None, images: int = 10_000,
                bins: int = 20) -> dict:
    """Why EDM works or fails behind a router: a ``main.py test`` job of :class:`~edm_lightning.defense.DiagnosticsModule`.

    Returns:
        ``share_test`` (and ``share_surrogate``) per member, and the coherence histograms with their edges.
    """
    sets = ["test", "ood"] + (["surrogate"] if surrogate is not None else [])
    data = class_config(ProbeDataModule, {"dataset": config.dataset, "sets": sets, "ood_dataset": config.edm.ood_dataset,
                                          "surrogate": surrogate, "root": config.root, "test_size": config.test_size,
                                          "images": images})
    model = class_config(DiagnosticsModule, {"victim": victim_config(config, victim), "bins": bins})
    return _probe(config, folder, "diagnostics", model, data).model.figures


def routing_spread(config: ExperimentConfig, folder: Path, victim: dict, attack: AttackConfig, seed: int,
                   images: int = 1000) -> dict:
    """How many distinct members the K copies of one surrogate image reach behind ``victim``'s router: a
    ``main.py test`` job of :class:`~edm_lightning.attacks.CopySpreadModule` on ``images`` surrogate images.

    Returns:
        ``distinct_members``, ``distinct_if_random`` (the same for a uniform random router) and ``share_on_plain_member``.
    """
    averaging = attack.averaging
    model = class_config(CopySpreadModule, {
        "victim": victim_config(config, victim), "copies": averaging["query_copies"], "copy_noise": averaging["copy_noise"],
        "copy_shift": averaging["copy_shift"], "seed": seed})
    data = class_config(ProbeDataModule, {"dataset": config.dataset, "sets": ["surrogate"], "ood_dataset": None,
                                          "surrogate": attack.surrogate, "root": config.root, "images": images})
    return _probe(config, folder, "spread", model, data).model.figures


def _probe(config: ExperimentConfig, folder: Path, job_type: str, model: dict, data: dict) -> JobRun:
    """A test-only job of a trained victim (nothing is trained or checkpointed), as ``main.py test`` runs it.

    Returns:
        The finished job; its model holds the figures.
    """
    trainer = trainer_config(config, folder, None, job_type, 1, []) | {
        # on the CPU in float32 whatever the experiment's device: the victim as it is served, figures that do not
        # depend on where the stage ran (its key does not say)
        "accelerator": "cpu", "precision": "32-true", "enable_progress_bar": False, "enable_checkpointing": False,
        "inference_mode": False}  # Prediction Poisoning differentiates a proxy for each answer
    job = {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}
    return run_stage_job(config, folder, job, tested=None, fit=False, test_checkpoint=None)


def attack(config: ExperimentConfig, folder: Path, settings: AttackConfig, victim: dict, budget: int, seed: int) -> dict:
    """One attack against one victim at one budget: clone accuracy, agreement, queries.

    An attack whose budgets share one purchase (KnockoffNets' transfer set, keyed by victim, seed and sampling
    setting, never by budget) keeps it in the experiment's shared ``transfers/`` folder, so every budget of a
    curve reads a prefix of one set bought once; the others (JBDA, DFME, MAZE query as their clone learns) keep
    their caches in the stage folder. The clone's final weights are kept as ``last.ckpt`` (what the stage's
    ``config.yaml`` tests).

    Returns:
        The attack's figures (:func:`~edm_lightning.attacks.attack_figures`).
    """
    cache = transfer_dir(config) if ATTACKS.get(settings.name).shares_purchase else folder / "cache"
    job = attack_job(config, settings, victim_config(config, victim), budget, seed, cache)
    last = class_config(ModelCheckpoint, {"dirpath": str(folder), "save_last": True, "save_top_k": 0,
                                          "enable_version_counter": False})
    trainer = trainer_config(config, folder, seed, "attack", job.max_epochs, [last])
    cli_config = job.cli_config() | {"trainer": trainer | {"enable_progress_bar": False, "num_sanity_val_steps": 0}}
    run = run_stage_job(config, folder, cli_config, tested="last.ckpt", test_checkpoint=None)
    return attack_figures(run.datamodule, run.model, run.metrics, run.fit_seconds)


def attack_job(config: ExperimentConfig, settings: AttackConfig, victim: Any, budget: int, seed: int,
               cache: Path) -> AttackJob:
    """The attack's job as its stage builds it (nothing is built or bought yet): the runner's arguments, the
    experiment's (:func:`attack_arguments`) and the config's ``options``, against ``victim``.

    Returns:
        The :class:`~edm_lightning.attacks.AttackJob`.
    """
    entry = ATTACKS.get(settings.name)
    return entry.build(victim, **entry.runner_arguments(settings.epochs, settings.surrogate, str(cache)),
                       **attack_arguments(config, settings, budget, seed), **settings.options)


def attack_arguments(config: ExperimentConfig, settings: AttackConfig, budget: int, seed: int) -> dict[str, Any]:
    """The job arguments every attack gets from the experiment (:data:`COMMON_ATTACK_ARGUMENTS`), never from ``options``.

    Returns:
        Keyword arguments of the attack's ``*_job`` function.
    """
    return dict(dataset=config.dataset, budget=budget, label_only=settings.label_only, arch=settings.arch,
                root=config.root, test_size=config.test_size, seed=seed)


def check_attack_options(settings: AttackConfig) -> None:
    """Refuse ``options`` the attack does not take, that the experiment sets itself, or of the wrong type, before any
    stage runs.

    Raises:
        ConfigError: an unregistered attack (the message lists the registered ones), an unknown or experiment-set option
            (the message lists those that can be set), or a value of the wrong type.
    """
    entry = ATTACKS.get(settings.name)
    set_here = set(entry.runner_arguments(settings.epochs, settings.surrogate, "")) | set(COMMON_ATTACK_ARGUMENTS)
    entry.check_options(settings.options, set_here, f"attack {settings.title}")


#: Arguments every attack gets from the experiment (:func:`attack_arguments`), never from ``options``.
COMMON_ATTACK_ARGUMENTS = ("dataset", "budget", "label_only", "arch", "root", "test_size", "seed")


def transfer_dir(config: ExperimentConfig) -> Path:
    """Where the experiment's KnockoffNets transfer sets live, shared by every budget and clone."""
    return Path(config.runs_dir) / config.name / "transfers"


def victim_config(config: ExperimentConfig, victim: dict) -> VictimConfig:
    """The VictimConfig a planned victim stands for (checkpoint, router, post-processors), with the fingerprint of
    its router key: a stage's config.yaml re-run without the experiment's key is refused, not routed another way.

    Returns:
        The victim's config (the key itself is left out of every written config).
    """
    return VictimConfig(victim["checkpoint"], router=victim["router"], hash_checkpoint=victim.get("hash_checkpoint"),
                        key=config.edm.router_key, key_fingerprint=_fingerprint(config, victim["router"]),
                        postprocessors=victim.get("postprocessors", []), detector=victim.get("detector"))


def _fingerprint(config: ExperimentConfig, router: str) -> str | None:
    """The public fingerprint of the experiment's router key, for a keyed ``router`` (else ``None``)."""
    return key_fingerprint(config.edm.router_key) if router_class(router).keyed else None
