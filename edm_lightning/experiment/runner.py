"""The EDM evaluation for one dataset: targets, hash networks and ensembles, then attacks on both.

Stages (each cached under ``runs_dir`` by the hash of its configuration, see :mod:`.stages`):

1. per seed, the undefended target; the hash network of the neural router; one EDM ensemble per
   diversity weight (lambda), and its defended test accuracy behind each router;
2. per seed, attack and budget, the attack against the target and against the main EDM ensemble;
   for the trade-off curve, the first attack at its largest budget against every other lambda;
3. the results: ``results.md``, ``results.csv``, ``records.csv`` and PNG plots in
   ``<results_dir>/<name>/``, written atomically once everything has run, and logged to W&B.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from edm_lightning.data import ClassificationDataModule, EDMDataModule, get_spec
from edm_lightning.defense import VictimConfig
from edm_lightning.defense.routing import HashBalanceCallback
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import results as report
from edm_lightning.experiment.stages import StageStore, config_key
from edm_lightning.models import ClassifierModule, EnsembleModule, OptimConfig
from edm_lightning.tracking import finish_wandb_run, resolve_wandb_mode

__all__ = ["AttackSpec", "EDMSpec", "ExperimentConfig", "HashNetSpec", "TrainSpec", "run_experiment"]

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
        options: further keyword arguments of the attack's ``run_*`` function.
    """

    name: Literal["knockoff", "jbda", "jbda_tr", "dfme"] = "knockoff"
    budgets: list[int] = field(default_factory=lambda: [50_000])
    epochs: int = 10
    surrogate: str = "mnist"
    arch: str = "lenet5"
    label_only: bool = False
    options: dict[str, Any] = field(default_factory=dict)


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


def run_experiment(config: ExperimentConfig, log=None) -> list[dict]:
    """Run (or reuse) every stage of ``config``, write the results, and return the attack records."""
    log = log or sys.stderr
    validate(config, log)
    weights = [config.edm.diversity_weight] + [w for w in config.edm.tradeoff_weights if w != config.edm.diversity_weight]
    attack_runs = _planned_attacks(config, weights)
    per_seed = 1 + ("neural" in config.edm.routers) + len(weights) * (1 + len(config.edm.routers))
    total = len(config.seeds) * per_seed + len(attack_runs)
    store = StageStore(Path(config.runs_dir) / config.name, total=total, log=log)
    if config.wandb_project:
        resolve_wandb_mode()
    start = time.perf_counter()

    victims: dict[tuple, dict] = {}
    for seed in config.seeds:
        target = _train_target(store, config, seed)
        victims[("none", None, seed)] = target
        hashnet = _train_hashnet(store, config, seed) if "neural" in config.edm.routers else None
        for weight in weights:
            ensemble = _train_edm(store, config, seed, weight, hashnet)
            for router in config.edm.routers:  # one ensemble, served behind each router
                served = _serve_edm(store, config, ensemble, router)
                victims[(f"edm-{router}", weight, seed)] = {**ensemble, "router": router, "test_acc": served["test_acc"]}

    records = []
    for attack, defense, weight, budget, seed in attack_runs:
        victim = victims[(defense, weight, seed)]
        result = _attack(store, config, attack, victim, budget, seed, defense, weight)
        records.append({
            "attack": attack.name, "defense": defense, "diversity_weight": weight, "budget": budget, "seed": seed,
            "defender_acc": victim["test_acc"], "clone_acc": result["clone_acc"], "agreement": result["agreement"],
            "queries": result["queries"], "wall_time_s": result["wall_time_s"],
        })
    compute = sum(result.get("stage_wall_time_s", 0.0) for result in store.results)
    _write_results(config, records, victims, time.perf_counter() - start, compute, log)
    return records


def validate(config: ExperimentConfig, log=None) -> None:
    """Everything that can be checked before training starts: names, sizes, budgets, honesty of the setup."""
    log = log or sys.stderr
    spec = get_spec(config.dataset)
    get_spec(config.edm.ood_dataset)
    get_spec(config.hashnet.dataset)
    if not config.seeds:
        raise ConfigError("seeds must name at least one seed")
    if not config.attacks:
        raise ConfigError("attacks must name at least one attack")
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


def _planned_attacks(config: ExperimentConfig, weights: list[float]) -> list[tuple]:
    defenses = [f"edm-{router}" for router in config.edm.routers]
    runs = []
    for seed in config.seeds:
        for index, attack in enumerate(config.attacks):
            for budget in sorted(attack.budgets):
                runs.append((attack, "none", None, budget, seed))
                runs += [(attack, defense, weights[0], budget, seed) for defense in defenses]
            if index == 0:  # the trade-off curve: the first attack, at its largest budget, on every other lambda
                runs += [(attack, defenses[0], w, max(attack.budgets), seed) for w in weights[1:]]
    return runs


# --- stages ---------------------------------------------------------------------------------------


def _train_target(store: StageStore, config: ExperimentConfig, seed: int) -> dict:
    stage = {"dataset": config.dataset, "seed": seed, "spec": asdict(config.target), "test_size": config.test_size}

    def work(folder: Path) -> dict:
        data = ClassificationDataModule(config.dataset, config.root, config.target.batch_size,
                                        val_size=config.target.val_size, train_size=config.target.train_size,
                                        test_size=config.test_size, augment=config.target.augment)
        model = ClassifierModule(config.target.arch, data.num_classes, data.input_shape, data.mean, data.std,
                                 config.target.optim)
        metrics = _fit_and_test(model, data, config.target.epochs, folder, seed, config, "target")
        return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"]}

    return store.run("target", stage, work, label=f"{config.target.arch} on {config.dataset} (seed {seed})")


def _train_hashnet(store: StageStore, config: ExperimentConfig, seed: int) -> dict:
    spec = config.hashnet
    stage = {"dataset": spec.dataset, "balanced_on": config.dataset, "seed": seed, "spec": asdict(spec),
             "input_shape": get_spec(config.dataset).input_shape}

    def work(folder: Path) -> dict:
        target_spec = get_spec(config.dataset)
        data = ClassificationDataModule(spec.dataset, config.root, spec.batch_size, val_size=spec.val_size,
                                        train_size=spec.train_size, augment=spec.augment)
        if tuple(data.input_shape) != tuple(target_spec.input_shape):
            raise ConfigError(f"hashnet.dataset {spec.dataset!r} has shape {data.input_shape}, the target {target_spec.input_shape}")
        model = ClassifierModule(spec.arch, data.num_classes, data.input_shape, data.mean, data.std, spec.optim)
        balance = HashBalanceCallback(dataset=config.dataset, root=config.root)
        metrics = _fit_and_test(model, data, spec.epochs, folder, seed, config, "hashnet", callbacks=[balance])
        return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"]}

    return store.run("hashnet", stage, work, label=f"on {spec.dataset} (seed {seed})")


def _train_edm(store: StageStore, config: ExperimentConfig, seed: int, weight: float, hashnet: dict | None) -> dict:
    spec = config.edm
    stage = {"dataset": config.dataset, "seed": seed, "diversity_weight": weight,
             "spec": asdict(spec) | {"tradeoff_weights": None, "diversity_weight": None, "routers": spec.routers[:1]},
             "hashnet": hashnet and hashnet["checkpoint"], "test_size": config.test_size}

    def work(folder: Path) -> dict:
        data = EDMDataModule(config.dataset, spec.ood_dataset, config.root, spec.batch_size, val_size=spec.val_size,
                             train_size=spec.train_size, test_size=config.test_size, augment=spec.augment)
        model = EnsembleModule(spec.arch, spec.num_members, data.num_classes, data.input_shape, data.mean, data.std,
                               spec.optim, diversity_weight=weight, router=spec.routers[0], router_key=spec.router_key,
                               hash_checkpoint=hashnet and hashnet["checkpoint"])
        metrics = _fit_and_test(model, data, spec.epochs, folder, seed, config, "ensemble")
        keep = ("test/acc", "test/id/coherence", "test/ood/coherence", "test/id/coherent_share", "test/ood/coherent_share")
        shares = {k: v for k, v in metrics.items() if k.startswith("test/member_")}
        return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"],
                "hash_checkpoint": hashnet and hashnet["checkpoint"],
                **{k.removeprefix("test/"): metrics[k] for k in keep if k in metrics},
                **{k.removeprefix("test/"): v for k, v in shares.items()}}

    return store.run("edm", stage, work, label=f"N={spec.num_members} lambda={weight:g} (seed {seed})")


def _serve_edm(store: StageStore, config: ExperimentConfig, ensemble: dict, router: str) -> dict:
    """The defender's accuracy as served: the ensemble behind ``router``, on the test set, through DefendedModel."""
    stage = {"ensemble": ensemble["checkpoint"], "router": router, "test_size": config.test_size}

    def work(folder: Path) -> dict:
        import torch

        from edm_lightning.data import load_images

        model = _victim_config(config, ensemble, router).build()
        images, labels = load_images(config.dataset, config.root, train=False)
        images, labels = images[: config.test_size], labels[: config.test_size]
        correct = sum(int((model(x.float().div(255)).argmax(-1) == y).sum())
                      for x, y in zip(images.split(1024), labels.split(1024), strict=True))
        return {"test_acc": correct / len(labels)}

    return store.run("served", stage, work, label=f"{Path(ensemble['checkpoint']).parent.name} behind the {router} router")


def _victim_config(config: ExperimentConfig, victim: dict, router: str) -> VictimConfig:
    return VictimConfig(victim["checkpoint"], router=router, hash_checkpoint=victim.get("hash_checkpoint"),
                        key=config.edm.router_key)


def _attack(store: StageStore, config: ExperimentConfig, attack: AttackSpec, victim: dict, budget: int, seed: int,
            defense: str, weight: float | None) -> dict:
    from edm_lightning.attacks import run_dfme, run_jbda, run_knockoff

    stage = {"attack": asdict(attack) | {"budgets": None}, "budget": budget, "seed": seed,
             "victim": victim["checkpoint"], "router": victim.get("router", "fixed"), "test_size": config.test_size}

    def work(folder: Path) -> dict:
        victim_config = _victim_config(config, victim, victim.get("router", "fixed"))
        common = dict(dataset=config.dataset, budget=budget, label_only=attack.label_only, arch=attack.arch,
                      cache_dir=str(folder / "cache"), root=config.root, test_size=config.test_size, seed=seed)
        if attack.name == "knockoff":
            return run_knockoff(victim_config, surrogate=attack.surrogate, max_epochs=attack.epochs, **common, **attack.options)
        if attack.name in ("jbda", "jbda_tr"):
            return run_jbda(victim_config, targeted=attack.name == "jbda_tr", epochs_per_round=attack.epochs,
                            **common, **attack.options)
        return run_dfme(victim_config, max_epochs=attack.epochs, **common, **attack.options)

    label = f"{attack.name} vs {defense if defense == 'none' else f'{defense} lambda={weight:g}'} ({budget:,} queries, seed {seed})"
    return store.run("attack", stage, work, label=label)


def _fit_and_test(model: L.LightningModule, data: L.LightningDataModule, epochs: int, folder: Path, seed: int,
                  config: ExperimentConfig, job_type: str, callbacks=()) -> dict[str, float]:
    """Fit (resuming from ``last.ckpt`` if an earlier run was killed), then test the best checkpoint."""
    L.seed_everything(seed, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor="val/acc", mode="max", save_last=True)
    logger = _logger(config, job_type, folder, seed)
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=logger, default_root_dir=folder,
                        callbacks=[checkpoint, *callbacks], enable_progress_bar=False, enable_model_summary=False)
    try:
        last = folder / "last.ckpt"
        trainer.fit(model, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
        tested = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
    finally:
        finish_wandb_run()
    merged: dict[str, float] = {}
    for metrics in tested:  # one dict per test loader; keys already say which loader they are from
        merged.update({k.split("/dataloader_idx")[0]: float(v) for k, v in metrics.items()})
    return merged


def _logger(config: ExperimentConfig, job_type: str, folder: Path, seed: int):
    if not config.wandb_project:
        return False
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=config.wandb_project, group=config.name, job_type=job_type, save_dir=str(folder),
                       name=f"{config.name}-{job_type}-seed{seed}", tags=[config.dataset, job_type])


# --- results ----------------------------------------------------------------------------------------


def _write_results(config: ExperimentConfig, records: list[dict], victims: dict, wall_time: float, compute: float,
                   log) -> None:
    out = Path(config.results_dir) / config.name
    main_weight = config.edm.diversity_weight
    rows = []
    for attack in config.attacks:
        rows += report.summarise([r for r in records if r["attack"] == attack.name], max(attack.budgets), main_weight)
    notes = [
        f"Dataset {config.dataset}; target {config.target.arch}; EDM N={config.edm.num_members}, lambda={main_weight:g}, "
        f"OOD set {config.edm.ood_dataset}, routers {', '.join(config.edm.routers)}; seeds {config.seeds}; mean ± std over seeds.",
        f"Each attack at its largest budget. All stages took {compute / 60:.1f} min when they ran; this invocation "
        f"took {wall_time / 60:.1f} min (cached stages cost nothing). Configuration key {config_key(config)}.",
    ]
    edm_stats = [v for (defense, w, _), v in victims.items() if defense == f"edm-{config.edm.routers[0]}" and w == main_weight]
    if edm_stats and "id/coherence" in edm_stats[0]:
        mean = lambda key: sum(s[key] for s in edm_stats) / len(edm_stats)  # noqa: E731
        notes.append(f"EDM coherence on in-distribution test data {mean('id/coherence'):.3f}, "
                     f"on held-out OOD data {mean('ood/coherence'):.3f}.")
    images = []
    first = config.attacks[0]
    if report.plot_budget_curve(records, first.name, main_weight, out / "budget_curve.png"):
        images.append("budget_curve.png")
    if config.edm.tradeoff_weights and report.plot_tradeoff(records, first.name, max(first.budgets),
                                                             f"edm-{config.edm.routers[0]}", out / "tradeoff.png"):
        images.append("tradeoff.png")
    notes += [f"![{name}]({name})" for name in images]
    report.write_csv(records, out / "records.csv")
    report.write_csv(rows, out / "results.csv")
    text = report.write_markdown(rows, out / "results.md", f"EDM evaluation: {config.name}", notes)
    print(text, file=log, flush=True)
    print(f"results: {out / 'results.md'}", file=log, flush=True)
    if config.wandb_project:
        _log_results_to_wandb(config, rows, [out / name for name in images], out)


def _log_results_to_wandb(config: ExperimentConfig, rows: list[dict], images: list[Path], out: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project=config.wandb_project, group=config.name, job_type="experiment",
                         name=f"{config.name}-results", save_dir=str(Path(config.runs_dir) / config.name),
                         tags=[config.dataset, "experiment"])
    try:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        logger.log_table("results", columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        for image in images:
            logger.log_image(image.stem, images=[str(image)])
        logger.experiment.config.update({"experiment": json.loads(json.dumps(asdict(config), default=str))})
    finally:
        finish_wandb_run()
