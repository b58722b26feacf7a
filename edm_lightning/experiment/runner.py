"""The EDM evaluation for one dataset: targets, hash networks and ensembles, the published defenses,
then attacks on all of them.

Stages (each cached under ``runs_dir`` by the hash of its configuration, see :mod:`.stages`):

1. per seed, the undefended target; the hash network of the neural router; one EDM ensemble per
   diversity weight (lambda), and its defended test accuracy behind each router; the misinformation
   model when a defense needs it; the defender's accuracy with each output-perturbation defense at each
   strength, on the target (the defense alone) and on EDM (the composition);
2. per seed, attack and budget, the attack against the target and against the main EDM ensemble;
   for the trade-off curves, each defense's attacks (the first attack by default) at their largest
   budget against every strength, and against every other lambda;
3. the results: ``results.md``, ``results.csv``, ``records.csv`` and PNG plots in
   ``<results_dir>/<name>/``, written atomically once everything has run, and logged to W&B.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from edm_lightning.data import ClassificationDataModule, EDMDataModule, get_spec
from edm_lightning.defense import VictimConfig
from edm_lightning.defense.postprocess import AdaptiveMisinformation, build_postprocessor, resolve_postprocessor
from edm_lightning.defense.routing import HashBalanceCallback
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import results as report
from edm_lightning.experiment.stages import StageStore, config_key
from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule, OptimConfig
from edm_lightning.tracking import finish_wandb_run, resolve_wandb_mode

__all__ = ["AttackSpec", "DefenseSpec", "EDMSpec", "ExperimentConfig", "HashNetSpec", "TrainSpec", "run_experiment"]

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


def run_experiment(config: ExperimentConfig, log=None) -> list[dict]:
    """Run (or reuse) every stage of ``config``, write the results, and return the attack records."""
    log = log or sys.stderr
    validate(config, log)
    weights = [config.edm.diversity_weight] + [w for w in config.edm.tradeoff_weights if w != config.edm.diversity_weight]
    attack_runs = _planned_attacks(config, weights)
    per_seed = (1 + ("neural" in config.edm.routers) + len(weights) * (1 + len(config.edm.routers))
                + _needs_misinformation(config) + sum(len(d.defends) * len(d.values) for d in config.defenses)
                + len(_averaging_attacks(config)) * len(config.edm.routers))
    total = len(config.seeds) * per_seed + len(attack_runs)
    store = StageStore(Path(config.runs_dir) / config.name, total=total, log=log)
    if config.wandb_project:
        resolve_wandb_mode()
    start = time.perf_counter()

    victims: dict[tuple, dict] = {}  # (defense, lambda, strength, seed) -> checkpoint, router, post-processors, accuracy
    spreads: dict[tuple, list[dict]] = {}  # (averaging attack, router) -> per seed, how many members its copies reach
    for seed in config.seeds:
        target = _train_target(store, config, seed)
        victims[("none", None, None, seed)] = {**target, "router": "fixed"}
        hashnet = _train_hashnet(store, config, seed) if "neural" in config.edm.routers else None
        for weight in weights:
            ensemble = _train_edm(store, config, seed, weight, hashnet)
            for router in config.edm.routers:  # one ensemble, served behind each router
                victim = {**ensemble, "router": router}
                victims[(f"edm-{router}", weight, None, seed)] = {**victim, **_serve(store, config, victim)}
        misinformation = _train_misinformation(store, config, seed) if _needs_misinformation(config) else None
        for defense in config.defenses:
            for base in defense.defends:
                weight = None if base == "none" else config.edm.diversity_weight
                for value in defense.values:
                    victim = {**victims[(base, weight, None, seed)],
                              "postprocessors": _postprocessors(defense, value, misinformation)}
                    victims[(_defense_label(defense, base), weight, value, seed)] = {**victim, **_serve(store, config, victim)}

        for attack in _averaging_attacks(config):  # why averaging works behind one router and not the other
            for router in config.edm.routers:
                victim = victims[(f"edm-{router}", config.edm.diversity_weight, None, seed)]
                spreads.setdefault((attack.title, router), []).append(_routing_spread(store, config, victim, attack, seed))

    strength_names = {_defense_label(d, base): d.strength for d in config.defenses for base in d.defends}
    records = []
    for attack, defense, weight, strength, budget, seed in attack_runs:
        victim = victims[(defense, weight, strength, seed)]
        result = _attack(store, config, attack, victim, budget, seed, defense, weight, strength)
        records.append({
            "attack": attack.title, "defense": defense, "diversity_weight": weight,
            "strength_name": strength_names.get(defense), "strength": strength, "budget": budget, "seed": seed,
            "defender_acc": victim["test_acc"], "clone_acc": result["clone_acc"], "agreement": result["agreement"],
            "queries": result["queries"], "wall_time_s": result["wall_time_s"],
        })
    compute = sum(result.get("stage_wall_time_s", 0.0) for result in store.results)
    _write_results(config, records, victims, spreads, time.perf_counter() - start, compute, log)
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


def _validate_defenses(config: ExperimentConfig, attack_titles: list[str]) -> None:
    """Every defense must name known attacks and bases, and every strength must build (ranges checked now)."""
    import torch

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
            post = _postprocessors(defense, value, {"checkpoint": stand_in})[0]
            build_postprocessor(post, spec.num_classes, spec.input_shape)


def _planned_attacks(config: ExperimentConfig, weights: list[float]) -> list[tuple]:
    """``(attack, defense, lambda, strength, budget, seed)`` for every attack run, in the order they run."""
    edm = [f"edm-{router}" for router in config.edm.routers]
    first = config.attacks[0].title
    curves = _curve_attacks(config)
    runs = []
    for seed in config.seeds:
        for attack in config.attacks:
            for budget in sorted(attack.budgets):
                runs.append((attack, "none", None, None, budget, seed))
                runs += [(attack, defense, weights[0], None, budget, seed) for defense in edm]
            if attack.title not in curves:
                continue
            budget = max(attack.budgets)  # the trade-off curves: every other lambda, every defense's strengths
            runs += [(attack, edm[0], w, None, budget, seed) for w in weights[1:]]
            for defense in config.defenses:
                if attack.title in (defense.attacks or [first]):
                    for base in defense.defends:
                        weight = None if base == "none" else weights[0]
                        runs += [(attack, _defense_label(defense, base), weight, v, budget, seed) for v in defense.values]
    return runs


def _curve_attacks(config: ExperimentConfig) -> list[str]:
    """Labels of the attacks with trade-off curves: the first attack and every attack a defense names."""
    return list(dict.fromkeys([config.attacks[0].title] + [title for d in config.defenses for title in d.attacks]))


def _averaging_attacks(config: ExperimentConfig) -> list[AttackSpec]:
    return [a for a in config.attacks if a.name == "knockoff" and int(a.options.get("query_copies", 1)) > 1]


def _defense_label(defense: DefenseSpec, base: str) -> str:
    return defense.name if base == "none" else f"{base}+{defense.name}"


def _needs_misinformation(config: ExperimentConfig) -> bool:
    return any(_is_adaptive_misinformation(d) and "misinformation_model" not in d.options for d in config.defenses)


def _is_adaptive_misinformation(defense: DefenseSpec) -> bool:
    return resolve_postprocessor({"class_path": defense.postprocessor})[0] is AdaptiveMisinformation


def _postprocessors(defense: DefenseSpec, value: float | None, misinformation: dict | None) -> list[dict]:
    """The ``VictimConfig.postprocessors`` entry of ``defense`` at strength ``value``."""
    init_args = dict(defense.options)
    if defense.strength is not None:
        init_args[defense.strength] = value
    if _is_adaptive_misinformation(defense) and "misinformation_model" not in init_args:
        init_args["misinformation_model"] = misinformation["checkpoint"]
    return [{"class_path": defense.postprocessor, "init_args": init_args}]


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


def _train_misinformation(store: StageStore, config: ExperimentConfig, seed: int) -> dict:
    """Adaptive Misinformation's misinformation model: trained on the defender's data to be confidently wrong."""
    spec = config.misinformation
    stage = {"dataset": config.dataset, "seed": seed, "spec": asdict(spec), "test_size": config.test_size}

    def work(folder: Path) -> dict:
        data = ClassificationDataModule(config.dataset, config.root, spec.batch_size, val_size=spec.val_size,
                                        train_size=spec.train_size, test_size=config.test_size, augment=spec.augment)
        model = MisinformationModule(spec.arch, data.num_classes, data.input_shape, data.mean, data.std, spec.optim)
        metrics = _fit_and_test(model, data, spec.epochs, folder, seed, config, "misinformation", monitor=("val/loss", "min"))
        return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"]}

    return store.run("misinformation", stage, work, label=f"{spec.arch} on {config.dataset} (seed {seed})")


def _serve(store: StageStore, config: ExperimentConfig, victim: dict) -> dict:
    """The defender's accuracy as served (router and post-processors on), on the test set, through DefendedModel."""
    posts = victim.get("postprocessors", [])
    stage = {"ensemble": victim["checkpoint"], "router": victim["router"], "test_size": config.test_size}
    if posts:
        stage["postprocessors"] = posts

    def work(folder: Path) -> dict:
        from edm_lightning.data import load_images

        model = _victim_config(config, victim).build()
        images, labels = load_images(config.dataset, config.root, train=False)
        images, labels = images[: config.test_size], labels[: config.test_size]
        correct = sum(int((model(x.float().div(255)).argmax(-1) == y).sum())
                      for x, y in zip(images.split(1024), labels.split(1024), strict=True))
        return {"test_acc": correct / len(labels)}

    what = " + ".join(f"{p['class_path']}({', '.join(f'{k}={v}' for k, v in p['init_args'].items() if k != 'misinformation_model')})"
                      for p in posts)
    label = f"{Path(victim['checkpoint']).parent.name} behind the {victim['router']} router" + (f" + {what}" if what else "")
    return store.run("served", stage, work, label=label)


def _routing_spread(store: StageStore, config: ExperimentConfig, victim: dict, attack: AttackSpec, seed: int,
                    images: int = 1000) -> dict:
    """How many distinct members the K copies of one surrogate image reach behind ``victim``'s router, and
    the share of copies answered by the member the unperturbed image gets (on ``images`` surrogate images)."""
    options = attack.options
    copies, noise, shift = int(options["query_copies"]), float(options.get("copy_noise", 0)), int(options.get("copy_shift", 0))
    stage = {"ensemble": victim["checkpoint"], "router": victim["router"], "surrogate": attack.surrogate, "seed": seed,
             "query_copies": copies, "copy_noise": noise, "copy_shift": shift, "images": images}

    def work(folder: Path) -> dict:
        import torch

        from edm_lightning.attacks.knockoff import noisy_copies
        from edm_lightning.data.images import convert_images, load_images

        model = _victim_config(config, victim).build()
        x = convert_images(load_images(attack.surrogate, config.root, train=True)[0][:images], model.input_shape).float().div(255)
        with torch.no_grad():
            plain = model.router(x)
            routes = model.router(noisy_copies(x, copies, noise, seed, shift=shift)).view(len(x), copies)
        distinct = torch.tensor([len(torch.unique(row)) for row in routes], dtype=torch.float64)
        uniform = model.router.num_members * (1 - (1 - 1 / model.router.num_members) ** copies)
        return {"distinct_members": float(distinct.mean()), "distinct_if_random": uniform,
                "share_on_plain_member": float((routes == plain[:, None]).double().mean())}

    return store.run("spread", stage, work, label=f"{attack.title} copies behind the {victim['router']} router (seed {seed})")


def _victim_config(config: ExperimentConfig, victim: dict) -> VictimConfig:
    return VictimConfig(victim["checkpoint"], router=victim["router"], hash_checkpoint=victim.get("hash_checkpoint"),
                        key=config.edm.router_key, postprocessors=victim.get("postprocessors", []))


def _attack(store: StageStore, config: ExperimentConfig, attack: AttackSpec, victim: dict, budget: int, seed: int,
            defense: str, weight: float | None, strength: float | None) -> dict:
    from edm_lightning.attacks import run_dfme, run_jbda, run_knockoff

    # The label only names the attack in the results; budgets stays in the key as None, as it always was,
    # so stages of earlier runs keep their keys.
    spec = {k: v for k, v in asdict(attack).items() if k != "label"} | {"budgets": None}
    stage = {"attack": spec, "budget": budget, "seed": seed,
             "victim": victim["checkpoint"], "router": victim["router"], "test_size": config.test_size}
    if victim.get("postprocessors"):
        stage["postprocessors"] = victim["postprocessors"]

    def work(folder: Path) -> dict:
        victim_config = _victim_config(config, victim)
        common = dict(dataset=config.dataset, budget=budget, label_only=attack.label_only, arch=attack.arch,
                      cache_dir=str(folder / "cache"), root=config.root, test_size=config.test_size, seed=seed)
        if attack.name == "knockoff":
            return run_knockoff(victim_config, surrogate=attack.surrogate, max_epochs=attack.epochs, **common, **attack.options)
        if attack.name in ("jbda", "jbda_tr"):
            return run_jbda(victim_config, targeted=attack.name == "jbda_tr", epochs_per_round=attack.epochs,
                            **common, **attack.options)
        return run_dfme(victim_config, max_epochs=attack.epochs, **common, **attack.options)

    setting = ", ".join(part for part in (weight is not None and f"lambda={weight:g}",
                                          strength is not None and f"strength={strength:g}") if part)
    label = f"{attack.title} vs {defense}{f' ({setting})' if setting else ''} ({budget:,} queries, seed {seed})"
    return store.run("attack", stage, work, label=label)


def _fit_and_test(model: L.LightningModule, data: L.LightningDataModule, epochs: int, folder: Path, seed: int,
                  config: ExperimentConfig, job_type: str, callbacks=(), monitor=("val/acc", "max")) -> dict[str, float]:
    """Fit (resuming from ``last.ckpt`` if an earlier run was killed), then test the best checkpoint by ``monitor``."""
    L.seed_everything(seed, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor[0], mode=monitor[1], save_last=True)
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


def _write_results(config: ExperimentConfig, records: list[dict], victims: dict, spreads: dict, wall_time: float,
                   compute: float, log) -> None:
    out = Path(config.results_dir) / config.name
    main_weight = config.edm.diversity_weight
    rows = []
    for attack in config.attacks:
        rows += report.summarise([r for r in records if r["attack"] == attack.title], max(attack.budgets), main_weight)
    notes = [
        f"Dataset {config.dataset}; target {config.target.arch}; EDM N={config.edm.num_members}, lambda={main_weight:g}, "
        f"OOD set {config.edm.ood_dataset}, routers {', '.join(config.edm.routers)}; seeds {config.seeds}; mean ± std over seeds.",
        f"Each attack at its largest budget. All stages took {compute / 60:.1f} min when they ran; this invocation "
        f"took {wall_time / 60:.1f} min (cached stages cost nothing). Configuration key {config_key(config)}.",
    ]
    edm_stats = [v for (defense, w, _, _), v in victims.items() if defense == f"edm-{config.edm.routers[0]}" and w == main_weight]
    if edm_stats and "id/coherence" in edm_stats[0]:
        notes.append(f"EDM coherence on in-distribution test data {mean(s['id/coherence'] for s in edm_stats):.3f}, "
                     f"on held-out OOD data {mean(s['ood/coherence'] for s in edm_stats):.3f}.")
    notes += _defense_notes(config, rows, spreads)
    images = []
    first = config.attacks[0]
    if report.plot_budget_curve(records, first.title, main_weight, out / "budget_curve.png"):
        images.append("budget_curve.png")
    for title in _curve_attacks(config) if config.edm.tradeoff_weights or config.defenses else []:
        attack = next(a for a in config.attacks if a.title == title)
        name = "tradeoff.png" if title == first.title else f"tradeoff_{title}.png"
        if report.plot_tradeoff(records, title, max(attack.budgets), out / name):
            images.append(name)
    notes += [f"![{name}]({name})" for name in images]
    report.write_csv(records, out / "records.csv")
    report.write_csv(rows, out / "results.csv")
    text = report.write_markdown(rows, out / "results.md", f"EDM evaluation: {config.name}", notes)
    print(text, file=log, flush=True)
    print(f"results: {out / 'results.md'}", file=log, flush=True)
    if config.wandb_project:
        _log_results_to_wandb(config, rows, [out / name for name in images], out)


def _defense_notes(config: ExperimentConfig, rows: list[dict], spreads: dict) -> list[str]:
    """The two questions users ask: which defense costs at most 1 point and stops the clone most, and how
    much of EDM's protection survives query averaging (and at how many extra queries)."""
    notes = []
    first = config.attacks[0]
    for title in _curve_attacks(config) if config.defenses else []:
        best = report.best_within(rows, title, 0.01)
        if best:
            ranking = "; ".join(f"{r['defense']}{f' ({report.setting(r)})' if report.setting(r) else ''} "
                                f"{r['clone_acc_mean'] * 100:.1f}%" for r in best[:6])
            notes.append(f"{title}: at most 1 point of defender accuracy lost, lowest clone accuracy first: {ranking}.")
    for attack in config.attacks:
        copies = int(attack.options.get("query_copies", 1))
        if attack.name != "knockoff" or copies == 1 or attack.title == first.title:
            continue
        for router in config.edm.routers:
            plain, averaged = (next((r for r in rows if r["attack"] == t and r["defense"] == f"edm-{router}"), None)
                               for t in (first.title, attack.title))
            spread = spreads.get((attack.title, router))
            reach = (f"; the {copies} copies of an image reach {mean(s['distinct_members'] for s in spread):.2f} distinct "
                     f"members ({spread[0]['distinct_if_random']:.2f} if routed at random), "
                     f"{mean(s['share_on_plain_member'] for s in spread):.0%} of them the image's own") if spread else ""
            if plain and averaged and plain.get("clone_acc_drop_mean", 0) > 0:
                kept = averaged["clone_acc_drop_mean"] / plain["clone_acc_drop_mean"]
                notes.append(
                    f"{attack.title} (K={copies} copies, noise {attack.options.get('copy_noise', 0)}, shift "
                    f"{attack.options.get('copy_shift', 0)} px; {averaged['queries_mean']:,.0f} queries, {copies - 1} extra per "
                    f"image) against edm-{router}: EDM keeps {kept:.0%} of its protection (clone accuracy drop against the "
                    f"undefended model under the same attack {averaged['clone_acc_drop_mean'] * 100:.1f} vs "
                    f"{plain['clone_acc_drop_mean'] * 100:.1f} points under {first.title}; clone accuracy "
                    f"{averaged['clone_acc_mean'] * 100:.1f}% vs {plain['clone_acc_mean'] * 100:.1f}%){reach}."
                )
    return notes


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
