"""The plan of an experiment: every stage it needs, in an order that respects their dependencies.

A stage is named by its kind and the hash of its configuration (``<runs>/<name>/<kind>-<key>/``), so the
plan is known before anything runs: a checkpoint a later stage needs is ``<that stage's folder>/best.ckpt``.
The plan is a value: ``--dry_run`` prints it (which stages are already done, estimated time), tests
inspect it, and the runner walks it.

Stages per seed: the undefended target; the hash network of the neural router; one EDM ensemble per
diversity weight (lambda) and its test accuracy behind each router; the misinformation model when a
defense needs it; the defender's accuracy with each output-perturbation defense at each strength, on the
target (the defense alone) and on EDM (the composition); behind each router, the members' shares of the
defender's and the attacker's images and the ensemble's coherence in and out of distribution; for each
query-averaging attack, how many members its copies reach behind each router. Then per seed, attack and
budget, the attack against the target and against the main EDM ensemble; for the trade-off curves, each
defense's attacks at their largest budget against every strength, and against every other lambda.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edm_lightning.attacks import ATTACKS
from edm_lightning.data import get_spec
from edm_lightning.experiment import jobs
from edm_lightning.experiment.config import (
    AttackConfig,
    ExperimentConfig,
    averaging_attacks,
    curve_attacks,
    defense_label,
    detector_attacks,
    needs_misinformation,
    postprocessor_configs,
    stage_spec,
    surrogate_attacks,
)
from edm_lightning.files import Secret, digest
from edm_lightning.models import Synthesis
from edm_lightning.routing import DEFAULT_ROUTER_KEY, key_fingerprint, resolve_router_key, router_class, router_label

__all__ = ["Plan", "Stage", "build_plan"]


@dataclass
class Stage:
    """One unit of work, cached by its configuration.

    Args:
        kind: ``target``, ``hashnet``, ``edm``, ``misinformation``, ``served``, ``diagnostics``, ``spread``,
            ``benign`` (a detector's benign clients) or ``attack``.
        key: the stage's configuration; its hash names the folder, so changing any of it reruns the stage.
        label: what the progress line calls it.
        work: ``folder -> result`` (the figures written to ``result.json``).
        needs: ids of the stages whose outputs it reads (or, for a KnockoffNets budget, the next smaller budget of
            its curve, which buys the first part of their shared transfer set).
        estimate_s: expected seconds on a 2-core CPU (what the ETA starts from).
    """

    kind: str
    key: dict[str, Any]
    label: str
    work: Callable[[Path], dict] = field(repr=False)
    needs: tuple[str, ...] = ()
    estimate_s: float = 0.0

    @property
    def id(self) -> str:
        """``<kind>-<digest of key>``: the stage's folder name, the same in every run of the same config."""
        return f"{self.kind}-{digest(self.key)}"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The files of its folder that outlive it (:data:`~.jobs.STAGE_OUTPUTS`)."""
        return jobs.STAGE_OUTPUTS.get(self.kind, ())

    @property
    def figures(self) -> tuple[str, ...]:
        """What the runner reads back from its ``result.json`` (:data:`~.jobs.RESULT_FIGURES`)."""
        return jobs.RESULT_FIGURES.get(self.kind, ())

    @property
    def checks(self) -> dict[str, tuple[str, ...]]:
        """``outputs`` and ``figures``, as :class:`~.stages.StageStore` takes them."""
        return {"outputs": self.outputs, "figures": self.figures}


@dataclass
class Plan:
    """The stages of one experiment, in run order, and the victims they serve (for the results)."""

    root: Path
    stages: list[Stage]
    victims: dict[tuple, dict]  # (defense, lambda, strength, seed) -> checkpoint, router, ..., stage ids
    spreads: dict[tuple, list[str]]  # (averaging attack, router) -> spread stage id per seed
    diagnostics: dict[str, list[str]]  # router -> diagnostics stage id per seed (member shares, coherence)
    attack_runs: list[tuple[str, dict]]  # (attack stage id, where it ran), one per results record

    def folder(self, stage: Stage) -> Path:
        """Where ``stage`` writes its outputs."""
        return self.root / stage.id

    def __getitem__(self, stage_id: str) -> Stage:
        return next(stage for stage in self.stages if stage.id == stage_id)


def build_plan(config: ExperimentConfig) -> Plan:
    """Every stage ``config`` needs, dependencies first; nothing is trained or read from disk."""
    root = Path(config.runs_dir) / config.name
    builder = _Builder(config, root)
    for seed in config.seeds:
        builder.seed_stages(seed)
    for run in builder.attack_runs():
        builder.attack(*run)
    return Plan(root, builder.stages, builder.victims, builder.spreads, builder.diagnostics, builder.runs)


class _Builder:
    def __init__(self, config: ExperimentConfig, root: Path):
        self.config, self.root = config, root
        self.stages: list[Stage] = []
        self.victims: dict[tuple, dict] = {}
        self.spreads: dict[tuple, list[str]] = {}
        self.diagnostics: dict[str, list[str]] = {}
        self.runs: list[tuple[str, dict]] = []
        self.curve_ends: dict[tuple, str] = {}  # (attack, defense, lambda, strength, seed) -> its largest budget so far
        self.setups: set[tuple] = set()  # work an attack shares between victims (D-DAE's kit), estimated once
        self.strength_names = {defense_label(d, base): d.strength for d in config.defenses for base in d.defends}
        self.weights = [config.edm.diversity_weight] + [
            w for w in config.edm.tradeoff_weights if w != config.edm.diversity_weight]
        self.train_images = _train_images(config)
        # The keyed routers' key decides their routes, so it is part of every stage behind them, as a Secret: hashed
        # into the stage's folder name, shown as a fingerprint in its config.json. The public default key is
        # left out of the keys of served and attack stages, so stages of earlier runs keep their folders.
        keyed = any(router_class(router).keyed for router in config.edm.routers)
        key = resolve_router_key(config.edm.router_key) if keyed else DEFAULT_ROUTER_KEY.encode()
        self.router_key = Secret(key.decode("latin-1"), f"<router key, fingerprint {key_fingerprint(key)}>")
        self.key_identity = {} if key == DEFAULT_ROUTER_KEY.encode() else {"router_key": self.router_key}

    def add(self, stage: Stage) -> Stage:
        if all(stage.id != other.id for other in self.stages):
            self.stages.append(stage)
        return stage

    def keyed(self, victim: dict) -> dict:
        """The router key's part of a stage key behind ``victim`` (nothing for the public default key)."""
        return self.key_identity if router_class(victim["router"]).keyed else {}

    def output(self, stage: Stage) -> str:
        return str(self.root / stage.id / "best.ckpt")

    def seed_stages(self, seed: int) -> None:
        config, work = self.config, functools.partial
        target = self.add(Stage(
            "target", {"dataset": config.dataset, "seed": seed, "spec": stage_spec(config.target), "test_size": config.test_size},
            f"{config.target.arch} on {config.dataset} (seed {seed})", work(jobs.train_target, config, seed=seed),
            estimate_s=_training_s(config.target, self.train_images)))
        self.victims[("none", None, None, seed)] = {"checkpoint": self.output(target), "router": "fixed",
                                                    "trained": target.id, "served": target.id}
        hashnet = None
        if any(router_class(router).needs_hash_network for router in config.edm.routers):
            settings = config.hashnet
            hashnet = self.add(Stage(
                "hashnet", {"dataset": settings.dataset, "balanced_on": config.dataset, "seed": seed,
                            "spec": stage_spec(settings),
                            "input_shape": get_spec(config.dataset).input_shape},
                f"on {settings.dataset} (seed {seed})", work(jobs.train_hashnet, config, seed=seed),
                estimate_s=_training_s(settings, 9_000)))
        hash_checkpoint = hashnet and self.output(hashnet)
        for weight in self.weights:
            settings = config.edm
            edm = self.add(Stage(
                "edm", {"dataset": config.dataset, "seed": seed, "diversity_weight": weight,
                        "spec": stage_spec(settings) | {"tradeoff_weights": None, "diversity_weight": None,
                                                    "routers": settings.routers[:1], "router_key": self.router_key},
                        "hashnet": hash_checkpoint, "test_size": config.test_size},
                f"N={settings.num_members} lambda={weight:g} (seed {seed})",
                work(jobs.train_edm, config, seed=seed, weight=weight, hash_checkpoint=hash_checkpoint),
                needs=(hashnet.id,) if hashnet else (),
                estimate_s=_ensemble_s(settings, self.train_images)))
            for router, label in zip(settings.routers, settings.router_labels):  # one ensemble, behind each router
                victim = {"checkpoint": self.output(edm), "router": router, "hash_checkpoint": hash_checkpoint,
                          "trained": edm.id}
                self.victims[(f"edm-{label}", weight, None, seed)] = {**victim, "served": self.serve(victim).id}
        misinformation = None
        if needs_misinformation(config):
            misinformation = self.add(Stage(
                "misinformation", {"dataset": config.dataset, "seed": seed, "spec": stage_spec(config.misinformation),
                                   "test_size": config.test_size},
                f"{config.misinformation.arch} on {config.dataset} (seed {seed})",
                work(jobs.train_misinformation, config, seed=seed),
                estimate_s=_training_s(config.misinformation, self.train_images)))
        for defense in config.defenses:
            for base in defense.defends:
                weight = None if base == "none" else config.edm.diversity_weight
                for value in defense.values:
                    model = misinformation and {"checkpoint": self.output(misinformation)}
                    victim = {**self.victims[(base, weight, None, seed)],
                              "postprocessors": postprocessor_configs(defense, value, model)}
                    served = self.serve(victim, extra=(misinformation.id,) if misinformation else ())
                    self.victims[(defense_label(defense, base), weight, value, seed)] = {**victim, "served": served.id}
        if config.benign_corruption.active:  # each victim's accuracy on mildly corrupted test images too
            for key, victim in self.victims.items():
                if key[-1] == seed and "corrupted" not in victim:  # after the clean one, which needs all it needs
                    victim["corrupted"] = self.serve(victim, extra=(victim["served"],), corrupted=True).id
        for setup in config.detectors:  # the same victims, watched per client; the benign clients are measured once
            for base in setup.defends:
                weight = None if base == "none" else config.edm.diversity_weight
                victim = {**self.victims[(base, weight, None, seed)], "detector": {**setup.options, "response": "misinform"}}
                benign = self.benign(victim, setup, seed)
                self.victims[(defense_label(setup, base), weight, None, seed)] = {**victim, "benign": benign.id}
        surrogate = next((a.surrogate for a in surrogate_attacks(config)), None)
        for router in config.edm.router_labels:  # member shares and coherence: why EDM works (or not) behind a router
            victim = self.victims[(f"edm-{router}", config.edm.diversity_weight, None, seed)]
            self.diagnostics.setdefault(router, []).append(self.diagnose(victim, surrogate).id)
        for attack in averaging_attacks(config):  # why averaging works behind one router and not the other
            for router in config.edm.router_labels:
                victim = self.victims[(f"edm-{router}", config.edm.diversity_weight, None, seed)]
                self.spreads.setdefault((attack.title, router), []).append(self.spread(victim, attack, seed).id)

    def serve(self, victim: dict, extra: tuple[str, ...] = (), corrupted: bool = False) -> Stage:
        """The stage measuring ``victim``'s defender accuracy, on the test images as they are or (``corrupted``) as
        the experiment's ``benign_corruption`` corrupts them.

        Returns:
            The stage (the plan's own, where an equal one was already added).
        """
        posts = victim.get("postprocessors", [])
        key = {"ensemble": victim["checkpoint"], "router": victim["router"], "test_size": self.config.test_size,
               **self.keyed(victim)}
        if posts:
            key["postprocessors"] = posts
        corruption = asdict(self.config.benign_corruption) if corrupted else None
        if corruption:  # only then, so the clean stages keep the folders of runs before the option
            key["benign_corruption"] = corruption
        what = " + ".join(f"{p['class_path']}({_shown_args(p['init_args'])})"
                          for p in posts)
        label = (f"{Path(victim['checkpoint']).parent.name} behind the {router_label(victim['router'])} router"
                 + (f" + {what}" if what else "")
                 + (f" on test images with noise {corruption['noise']:g} and shifts <= {corruption['shift']} px"
                    if corruption else ""))
        plain = _victim_dict(victim)
        return self.add(Stage("served", key, label,
                              functools.partial(jobs.served_accuracy, self.config, victim=plain, corruption=corruption),
                              needs=tuple(dict.fromkeys((victim["trained"], *extra))), estimate_s=2.0))

    def benign(self, victim: dict, setup, seed: int) -> Stage:
        key = {"victim": victim["checkpoint"], "router": victim["router"], "detector": victim["detector"], "seed": seed,
               "clients": setup.benign_clients, "queries": setup.benign_queries, "test_size": self.config.test_size,
               **self.keyed(victim)}
        plain = _victim_dict(victim)
        return self.add(Stage(
            "benign", key, f"{setup.benign_clients} benign clients of {Path(victim['checkpoint']).parent.name} behind the "
            f"{router_label(victim['router'])} router + {setup.name} (seed {seed})",
            functools.partial(jobs.benign_clients, self.config, victim=plain, clients=setup.benign_clients,
                              queries=setup.benign_queries, seed=seed),
            needs=(victim["trained"],), estimate_s=2.0 * setup.benign_clients))

    def diagnose(self, victim: dict, surrogate: str | None) -> Stage:
        key = {"ensemble": victim["checkpoint"], "router": victim["router"], "surrogate": surrogate,
               "ood_dataset": self.config.edm.ood_dataset, "test_size": self.config.test_size, **self.keyed(victim)}
        plain = _victim_dict(victim)
        return self.add(Stage(
            "diagnostics", key, f"{Path(victim['checkpoint']).parent.name} behind the {router_label(victim['router'])} router",
            functools.partial(jobs.diagnostics, self.config, victim=plain, surrogate=surrogate),
            needs=(victim["trained"],), estimate_s=3.0))

    def spread(self, victim: dict, attack: AttackConfig, seed: int) -> Stage:
        key = {"ensemble": victim["checkpoint"], "router": victim["router"], "surrogate": attack.surrogate, "seed": seed,
               **attack.averaging, "images": 1000, **self.keyed(victim)}
        plain = _victim_dict(victim)
        return self.add(Stage(
            "spread", key, f"{attack.title} copies behind the {router_label(victim['router'])} router (seed {seed})",
            functools.partial(jobs.routing_spread, self.config, victim=plain, attack=attack, seed=seed),
            needs=(victim["trained"],), estimate_s=2.0))

    def attack_runs(self) -> list[tuple]:
        """``(attack, defense, lambda, strength, budget, seed)`` for every attack run, in the order they run."""
        config, weights = self.config, self.weights
        edm = [f"edm-{router}" for router in config.edm.router_labels]
        first, curves = config.attacks[0].title, curve_attacks(config)
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
                            runs += [(attack, defense_label(defense, base), weight, v, budget, seed) for v in defense.values]
            for setup in config.detectors:  # every budget: when the detector flags each attack, and what it then costs
                for attack in detector_attacks(config, setup):
                    for base in setup.defends:
                        weight = None if base == "none" else weights[0]
                        runs += [(attack, defense_label(setup, base), weight, None, budget, seed)
                                 for budget in sorted(attack.budgets)]
        return runs

    def attack(self, settings: AttackConfig, defense: str, weight: float | None, strength: float | None, budget: int,
               seed: int) -> Stage:
        victim = self.victims[(defense, weight, strength, seed)]
        # The label only names the attack in the results; budgets stays in the key as None, as it always was,
        # so stages of earlier runs keep their keys.
        key = {"attack": {k: v for k, v in asdict(settings).items() if k != "label"} | {"budgets": None}, "budget": budget,
               "seed": seed, "victim": victim["checkpoint"], "router": victim["router"], "test_size": self.config.test_size,
               **self.keyed(victim)}
        if victim.get("postprocessors"):
            key["postprocessors"] = victim["postprocessors"]
        if victim.get("detector"):
            key["detector"] = victim["detector"]
        setting = ", ".join(part for part in (weight is not None and f"lambda={weight:g}",
                                              strength is not None and f"strength={strength:g}") if part)
        label = f"{settings.title} vs {defense}{f' ({setting})' if setting else ''} ({budget:,} queries, seed {seed})"
        plain = _victim_dict(victim)
        info = {"attack": settings.title, "answers": "top-1" if settings.label_only else "probabilities",
                "defense": defense, "diversity_weight": weight,
                "strength_name": self.strength_names.get(defense), "strength": strength, "budget": budget, "seed": seed,
                "served": victim["served"], "corrupted": victim.get("corrupted")}
        needs = (victim["trained"], victim["served"])
        curve = (settings.title, defense, weight, strength, seed)
        entry = ATTACKS.get(settings.name)
        if entry.shares_purchase and curve in self.curve_ends:
            # The budgets of one curve read prefixes of one purchase (KnockoffNets' transfer set): the smaller runs
            # first and buys its part, so every run (serial, workers, cluster) splits the purchase alike, and no
            # worker waits on the purchase's lock.
            needs += (self.curve_ends[curve],)
        stage = self.add(Stage("attack", key, label,
                               functools.partial(jobs.attack, self.config, settings=settings, victim=plain, budget=budget,
                                                 seed=seed),
                               needs=tuple(dict.fromkeys(needs)), estimate_s=self.attack_s(settings, budget, seed)))
        if entry.shares_purchase:
            self.curve_ends[curve] = stage.id
        self.runs.append((stage.id, info))
        return stage

    def attack_s(self, settings: AttackConfig, budget: int, seed: int) -> float:
        """An attack stage's estimate, with the work its attack shares between victims the first time it is planned."""
        entry, per_image = ATTACKS.get(settings.name), _SECONDS_PER_IMAGE_EPOCH.get(settings.arch, 1e-3)
        seconds = _STAGE_S + entry.cost(budget, settings.epochs, per_image, settings.options)
        if entry.setup is not None:
            identity, setup_s = entry.setup(per_image, settings.options)
            shared = (settings.name, settings.surrogate, settings.arch, seed, identity)
            if shared not in self.setups:
                self.setups.add(shared)
                seconds += setup_s
        return seconds


def _victim_dict(victim: dict) -> dict:
    """What a job needs to build a planned victim (checkpoint, router, post-processors), without its stage ids."""
    return {k: v for k, v in victim.items() if k not in ("trained", "served", "corrupted", "benign")}


# Seconds per training image and epoch of a LeNet-5-sized model on the 2-core CPU the defaults were
# measured on (validation and test included), per architecture; the runner rescales every estimate by
# what the finished stages of this run really took, so only the ratios between stages matter.
_SECONDS_PER_IMAGE_EPOCH = {"lenet5": 6e-5, "small_cnn": 5e-5, "resnet18": 6e-3, "vgg16_bn": 5e-3}
_ENSEMBLE_STEP = 1.6  # an EDM member also sees an OOD batch: its step costs more than a target's


_STAGE_S = 5.0  # what every training or attack stage costs beyond its epochs: building, loading, testing


def _epochs_s(settings, images: int) -> float:
    return settings.epochs * (settings.train_size or images) * _SECONDS_PER_IMAGE_EPOCH.get(settings.arch, 1e-3)


def _training_s(settings, images: int) -> float:
    return _STAGE_S + _epochs_s(settings, images)


def _ensemble_s(settings, images: int) -> float:
    """An EDM ensemble's training: N members, each step also on the OOD batch, and on what ``synthesis`` adds."""
    synthesis = Synthesis.of(settings.model.get("synthesis"))
    step = _ENSEMBLE_STEP * (synthesis.step_cost(settings.num_members) if synthesis is not None else 1.0)
    return _STAGE_S + _epochs_s(settings, images) * settings.num_members * step


def _train_images(config: ExperimentConfig) -> int:
    """Training images of the defender's dataset after validation is held out (60,000 for the MNIST family)."""
    sizes = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "emnist-letters": 124_800}
    return sizes.get(config.dataset, 60_000) - config.target.val_size


def _shown_args(init_args: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in init_args.items() if k != "misinformation_model")
