"""The work of each stage kind: train a model, measure a victim, run an attack, in a stage folder.

Each function takes the experiment's configuration and the stage's own parameters, works in ``folder``
and returns the stage's figures as a JSON-able dict (the stage's ``result.json``). They know nothing of
caching or ordering: :mod:`.plan` decides what runs, :mod:`.execution` runs it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from edm_lightning.attacks import DFMEModule, KnockoffDataModule, MAZEModule, run_dfme, run_jbda, run_knockoff, run_maze
from edm_lightning.attacks.knockoff import noisy_copies
from edm_lightning.data import ClassificationDataModule, EDMDataModule, get_spec
from edm_lightning.data.images import convert_images, load_images
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.experiment.config import AttackConfig, ExperimentConfig, TrainConfig
from edm_lightning.losses import coherence
from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule
from edm_lightning.models.hashnet import HashBalanceCallback
from edm_lightning.progress import EpochLines, interactive
from edm_lightning.registry import Registry
from edm_lightning.tracking import finish_wandb_run

__all__ = ["attack", "diagnostics", "routing_spread", "served_accuracy", "train_edm", "train_hashnet", "train_misinformation",
           "train_target", "victim_config"]


def train_target(config: ExperimentConfig, folder: Path, seed: int) -> dict:
    """The undefended target: its best checkpoint and test accuracy."""
    L.seed_everything(seed, verbose=False)  # before the model exists: its initial weights follow the seed, not
    #                                         whatever ran earlier in this process (a resumed run, a worker)
    settings = config.target
    data = _classification_data(config, config.dataset, settings, test_size=config.test_size)
    model = ClassifierModule(settings.arch, data.num_classes, data.input_shape, data.mean, data.std, settings.optim)
    metrics = fit_and_test(model, data, settings.epochs, folder, seed, config, "target")
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"]}


def train_hashnet(config: ExperimentConfig, folder: Path, seed: int) -> dict:
    """The neural router's hash network, trained on ``hashnet.dataset`` and balanced on the defender's data."""
    L.seed_everything(seed, verbose=False)
    settings = config.hashnet
    data = _classification_data(config, settings.dataset, settings)
    target_shape = get_spec(config.dataset).input_shape
    if tuple(data.input_shape) != tuple(target_shape):
        raise ConfigError(f"hashnet.dataset {settings.dataset!r} has shape {data.input_shape}, the target {target_shape}")
    model = ClassifierModule(settings.arch, data.num_classes, data.input_shape, data.mean, data.std, settings.optim)
    balance = HashBalanceCallback(dataset=config.dataset, root=config.root)
    metrics = fit_and_test(model, data, settings.epochs, folder, seed, config, "hashnet", callbacks=[balance])
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"]}


def train_edm(config: ExperimentConfig, folder: Path, seed: int, weight: float, hash_checkpoint: str | None) -> dict:
    """One EDM ensemble at diversity weight ``weight``: routed accuracy, coherence, members' shares."""
    L.seed_everything(seed, verbose=False)
    settings = config.edm
    data = EDMDataModule(config.dataset, settings.ood_dataset, config.root, settings.batch_size, val_size=settings.val_size,
                         train_size=settings.train_size, test_size=config.test_size, augment=settings.augment)
    model = EnsembleModule(settings.arch, settings.num_members, data.num_classes, data.input_shape, data.mean, data.std,
                           settings.optim, diversity_weight=weight, router=settings.routers[0], router_key=settings.router_key,
                           hash_checkpoint=hash_checkpoint)
    metrics = fit_and_test(model, data, settings.epochs, folder, seed, config, "ensemble")
    keep = ("test/acc", "test/id/coherence", "test/ood/coherence", "test/id/coherent_share", "test/ood/coherent_share")
    shares = {k: v for k, v in metrics.items() if k.startswith("test/member_")}
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"], "hash_checkpoint": hash_checkpoint,
            **{k.removeprefix("test/"): metrics[k] for k in keep if k in metrics},
            **{k.removeprefix("test/"): v for k, v in shares.items()}}


def train_misinformation(config: ExperimentConfig, folder: Path, seed: int) -> dict:
    """Adaptive Misinformation's misinformation model: trained on the defender's data to be confidently wrong."""
    L.seed_everything(seed, verbose=False)
    settings = config.misinformation
    data = _classification_data(config, config.dataset, settings, test_size=config.test_size)
    model = MisinformationModule(settings.arch, data.num_classes, data.input_shape, data.mean, data.std, settings.optim)
    metrics = fit_and_test(model, data, settings.epochs, folder, seed, config, "misinformation", monitor=("val/loss", "min"))
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": metrics["test/acc"]}


def served_accuracy(config: ExperimentConfig, folder: Path, victim: dict) -> dict:
    """The defender's accuracy as served (router and post-processors on), on the test set, through the Victim."""
    model = victim_config(config, victim).build()
    images, labels = load_images(config.dataset, config.root, train=False)
    images, labels = images[: config.test_size], labels[: config.test_size]
    correct = sum(int((model(x.float().div(255)).argmax(-1) == y).sum())
                  for x, y in zip(images.split(1024), labels.split(1024), strict=True))
    return {"test_acc": correct / len(labels)}


def diagnostics(config: ExperimentConfig, folder: Path, victim: dict, surrogate: str | None, images: int = 10_000,
                bins: int = 20) -> dict:
    """Why EDM works or fails behind a router: each member's share of the defender's test images and of the
    attacker's surrogate images (fair: 1/N each), and histograms of the ensemble's coherence on the test
    images and on held-out OOD images (in [0, 1]: 1 when all members agree).

    Returns:
        ``share_test`` (and ``share_surrogate``) per member, and the coherence histograms with their edges.
    """
    model = victim_config(config, victim).build()
    test = load_images(config.dataset, config.root, train=False)[0][: config.test_size]
    ood = load_images(config.edm.ood_dataset, config.root, train=False, input_shape=model.input_shape)[0][:images]
    result: dict[str, Any] = {"share_test": _member_shares(model, test)}
    if surrogate is not None:
        attacker = load_images(surrogate, config.root, train=True, input_shape=model.input_shape)[0][:images]
        result["share_surrogate"] = _member_shares(model, attacker)
    edges = torch.linspace(0, 1, bins + 1)
    for name, part in (("id", test), ("ood", ood)):
        values = torch.cat([coherence(torch.stack([member(x) for member in model.members]).softmax(dim=-1))
                            for x in _pixels(part)])
        result[f"coherence_{name}"] = torch.histc(values.clamp(0, 1), bins=bins, min=0, max=1).long().tolist()
    result["coherence_edges"] = edges.tolist()
    return result


def _member_shares(model, images: torch.Tensor) -> list[float]:
    routes = torch.cat([model.router(x) for x in _pixels(images)])
    return (torch.bincount(routes, minlength=model.router.num_members).double() / len(routes)).tolist()


def _pixels(images: torch.Tensor, chunk: int = 1024):
    with torch.no_grad():
        for part in images.split(chunk):
            yield part.float().div(255)


def routing_spread(config: ExperimentConfig, folder: Path, victim: dict, attack: AttackConfig, seed: int,
                   images: int = 1000) -> dict:
    """How many distinct members the K copies of one surrogate image reach behind ``victim``'s router, and
    the share of copies answered by the member the unperturbed image gets (on ``images`` surrogate images).

    Returns:
        ``distinct_members``, ``distinct_if_random`` (the same for a uniform random router) and ``share_on_plain_member``.
    """
    options = attack.options
    copies, noise, shift = int(options["query_copies"]), float(options.get("copy_noise", 0)), int(options.get("copy_shift", 0))
    model = victim_config(config, victim).build()
    x = convert_images(load_images(attack.surrogate, config.root, train=True)[0][:images], model.input_shape).float().div(255)
    with torch.no_grad():
        plain = model.router(x)
        routes = model.router(noisy_copies(x, copies, noise, seed, shift=shift)).view(len(x), copies)
    distinct = torch.tensor([len(torch.unique(row)) for row in routes], dtype=torch.float64)
    uniform = model.router.num_members * (1 - (1 - 1 / model.router.num_members) ** copies)
    return {"distinct_members": float(distinct.mean()), "distinct_if_random": uniform,
            "share_on_plain_member": float((routes == plain[:, None]).double().mean())}


def attack(config: ExperimentConfig, folder: Path, settings: AttackConfig, victim: dict, budget: int, seed: int) -> dict:
    """One attack against one victim at one budget: clone accuracy, agreement, queries.

    KnockoffNets keeps its transfer sets in the experiment's shared ``transfers/`` folder (keyed by victim,
    seed and sampling setting, never by budget), so every budget of a curve reads a prefix of one set
    bought once; JBDA and DFME query as their clone learns, so their caches stay in the stage folder.

    Returns:
        The attack's figures (:func:`~edm_lightning.attacks.run_attack`).
    """
    trainer = config.trainer.options() | {"logger": _logger(config, "attack", folder, seed)}
    common = dict(dataset=config.dataset, budget=budget, label_only=settings.label_only, arch=settings.arch,
                  root=config.root, test_size=config.test_size, seed=seed, trainer=trainer)
    target = victim_config(config, victim)
    try:
        return _run_attack(config, folder, settings, target, common)
    finally:
        finish_wandb_run()


def _run_attack(config: ExperimentConfig, folder: Path, settings: AttackConfig, target: VictimConfig, common: dict) -> dict:
    return ATTACK_RUNNERS.get(settings.name)(config, folder, settings, target, common)


@dataclass(frozen=True)
class AttackRunner:
    """How the runner runs one attack: its Python entry, and the arguments the experiment itself sets.

    Args:
        entry: the attack's ``run_*`` function (victim first, then keyword arguments).
        fixed: ``(config, folder, settings) -> kwargs`` the experiment sets (epochs, caches, surrogate).
        forwards_to: the class ``entry`` passes its ``**options`` to, whose arguments ``options`` may also set.
    """

    entry: Callable[..., dict]
    fixed: Callable[[ExperimentConfig, Path, AttackConfig], dict]
    forwards_to: type | None = None

    def __call__(self, config: ExperimentConfig, folder: Path, settings: AttackConfig, target: VictimConfig,
                 common: dict) -> dict:
        return self.entry(target, **self.fixed(config, folder, settings), **common, **settings.options)

    def default(self, option: str) -> Any:
        """The entry's default for ``option`` (for ``options`` the config leaves out).

        Returns:
            The default value.
        """
        return inspect.signature(self.entry).parameters[option].default

    def check_options(self, config: ExperimentConfig, settings: AttackConfig) -> None:
        """Refuse ``options`` the entry does not take, or that the experiment sets itself, before any stage runs.

        Raises:
            ConfigError: an unknown or experiment-set option (the message lists the ones that can be set).
        """
        parameters = inspect.signature(self.entry).parameters
        taken = {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD} - {"victim"}
        if self.forwards_to is not None:
            taken |= set(inspect.signature(self.forwards_to).parameters) - {"self", "victim"}
        set_here = set(self.fixed(config, Path("."), settings)) | set(COMMON_ATTACK_ARGUMENTS)
        wrong = sorted(set(settings.options) - (taken - set_here))
        if wrong:
            raise ConfigError(f"attack {settings.title}: options {wrong} are not arguments it takes, or are set by the "
                              f"experiment; it takes: {', '.join(sorted(taken - set_here))}")


#: Arguments every attack gets from the experiment (``common`` in :func:`attack`), never from ``options``.
COMMON_ATTACK_ARGUMENTS = ("dataset", "budget", "label_only", "arch", "root", "test_size", "seed", "trainer")

#: How the runner calls each attack of ``AttackConfig.name``.
ATTACK_RUNNERS: Registry[AttackRunner] = Registry("attack")
ATTACK_RUNNERS.register("knockoff")(AttackRunner(run_knockoff, lambda config, folder, settings: {
    "surrogate": settings.surrogate, "max_epochs": settings.epochs, "cache_dir": str(transfer_dir(config))},
    forwards_to=KnockoffDataModule))
ATTACK_RUNNERS.register("jbda")(AttackRunner(run_jbda, lambda config, folder, settings: {
    "targeted": False, "epochs_per_round": settings.epochs, "cache_dir": str(folder / "cache")}))
ATTACK_RUNNERS.register("jbda_tr")(AttackRunner(run_jbda, lambda config, folder, settings: {
    "targeted": True, "epochs_per_round": settings.epochs, "cache_dir": str(folder / "cache")}))
ATTACK_RUNNERS.register("dfme")(AttackRunner(run_dfme, lambda config, folder, settings: {
    "max_epochs": settings.epochs, "cache_dir": str(folder / "cache")}, forwards_to=DFMEModule))
ATTACK_RUNNERS.register("maze")(AttackRunner(run_maze, lambda config, folder, settings: {
    "max_epochs": settings.epochs, "cache_dir": str(folder / "cache")}, forwards_to=MAZEModule))


def transfer_dir(config: ExperimentConfig) -> Path:
    """Where the experiment's KnockoffNets transfer sets live, shared by every budget and clone."""
    return Path(config.runs_dir) / config.name / "transfers"


def victim_config(config: ExperimentConfig, victim: dict) -> VictimConfig:
    """The VictimConfig a planned victim stands for (checkpoint, router, post-processors)."""
    return VictimConfig(victim["checkpoint"], router=victim["router"], hash_checkpoint=victim.get("hash_checkpoint"),
                        key=config.edm.router_key, postprocessors=victim.get("postprocessors", []))


def fit_and_test(model: L.LightningModule, data: L.LightningDataModule, epochs: int, folder: Path, seed: int,
                 config: ExperimentConfig, job_type: str, callbacks=(), monitor=("val/acc", "max")) -> dict[str, float]:
    """Fit (resuming from ``last.ckpt`` if an earlier run was killed), then test the best checkpoint by ``monitor``.

    Lightning's own bar when standard error is a terminal, one line per epoch when it is not.

    Returns:
        The best checkpoint's test metrics, one dict over all test loaders.
    """
    L.seed_everything(seed, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor[0], mode=monitor[1], save_last=True,
                                 enable_version_counter=False)  # a resumed stage replaces best.ckpt, never best-v1.ckpt
    bar = interactive()
    trainer = L.Trainer(max_epochs=epochs, **config.trainer.options(), logger=_logger(config, job_type, folder, seed),
                        default_root_dir=folder, callbacks=[checkpoint, *callbacks, *([] if bar else [EpochLines()])],
                        enable_progress_bar=bar, enable_model_summary=False)
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


def _classification_data(config: ExperimentConfig, dataset: str, settings: TrainConfig, test_size: int | None = None
                         ) -> ClassificationDataModule:
    return ClassificationDataModule(dataset, config.root, settings.batch_size, val_size=settings.val_size,
                                    train_size=settings.train_size, test_size=test_size, augment=settings.augment)


def _logger(config: ExperimentConfig, job_type: str, folder: Path, seed: int) -> Any:
    """One W&B run per stage: the experiment as its group, the stage kind as its job type."""
    if not config.wandb_project:
        return False
    return WandbLogger(project=config.wandb_project, group=config.name, job_type=job_type, save_dir=str(folder),
                       name=f"{config.name}-{job_type}-seed{seed}", tags=[config.dataset, job_type])
