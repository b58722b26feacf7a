"""What every attack shares: the victim side of the experiment and the one way to run an attack.

An attack is a pair, as LightningCLI wants it: a DataModule that stands for the *experiment* (it
builds the victim from its config, puts it behind a :class:`BlackBoxOracle` with the budget, and
serves the victim's in-distribution test set for evaluation) and a LightningModule that is the
*attacker* (a clone, plus whatever the attack learns: a generator, a sampling policy). The attacker
reaches the victim only through ``datamodule.oracle``.

Evaluation labels (the victim's argmax on its own test set, needed for agreement) are computed
here once with the victim directly. They are the experimenter's measurement, not the attacker's
queries: they are not counted and are never given to attack code.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from edm_lightning.attacks.oracle import BlackBoxOracle
from edm_lightning.data.datamodules import LinkedSpec
from edm_lightning.data.images import BatchTensorDataset, batch_loader, convert_images, load_images
from edm_lightning.data.registry import get_spec
from edm_lightning.defense.victim import VictimConfig
from edm_lightning.errors import ConfigError

__all__ = ["AttackDataModule", "atomic_save", "run_attack"]


class AttackDataModule(LinkedSpec, L.LightningDataModule):
    """The victim behind an oracle, and the victim's test set (with the victim's labels) for evaluation.

    Everything that can be wrong with the input is checked in ``__init__``, before a query is spent:
    the victim checkpoint is loaded, its input shape and class count compared with ``dataset``, the
    budget compared with one query batch.

    Args:
        victim: the served model, as configs name it (checkpoint, router, ...). From Python an already
            built ``DefendedModel`` is accepted too.
        dataset: the victim's in-distribution dataset (registry name): its shape, class count and
            normalisation are linked into the clone, its test split measures the clone.
        budget: most victim queries the attack may spend.
        label_only: the oracle answers top-1 labels (one-hot) instead of probabilities.
        root: data root.
        batch_size: batch size of clone training, evaluation and of each oracle query.
        test_size: evaluate on only the first this-many test images; ``None`` for all.
        cache_dir: where the attack keeps what it bought (transfer sets, substitute sets), so a re-run
            or a resume never pays twice.
        num_workers: DataLoader workers.
        seed: seed of the attacker's own random draws (independent of the training seed).
    """

    def __init__(
        self,
        victim: VictimConfig,
        dataset: str = "fashionmnist",
        budget: int = 50_000,
        label_only: bool = False,
        root: str = "data",
        batch_size: int = 128,
        test_size: int | None = None,
        cache_dir: str = "runs/attacks/cache",
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["victim"])
        self.spec = get_spec(dataset)
        for key, value in {"budget": budget, "batch_size": batch_size, "test_size": test_size}.items():
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if budget < batch_size:
            raise ConfigError(
                f"budget={budget} is smaller than one query batch (batch_size={batch_size}): the attack could not "
                f"make a single query. Raise the budget or lower batch_size."
            )
        victim_model, self.victim_id = _build_victim(victim)
        if tuple(victim_model.input_shape) != tuple(self.spec.input_shape) or victim_model.num_classes != self.spec.num_classes:
            raise ConfigError(
                f"the victim takes inputs {tuple(victim_model.input_shape)} with {victim_model.num_classes} classes, but "
                f"dataset {dataset!r} has {self.spec.input_shape} with {self.spec.num_classes}: name the victim's own dataset."
            )
        self._victim_for_evaluation: nn.Module | None = victim_model  # dropped once the test labels exist
        self._victim_to_serve: nn.Module | None = victim_model  # handed to the oracle, then dropped
        self._oracle: BlackBoxOracle | None = None
        self._prepaid = 0  # queries bought by an earlier run and read back from the cache
        self.train_set: BatchTensorDataset | None = None
        self.test_set: BatchTensorDataset | None = None

    @property
    def oracle(self) -> BlackBoxOracle:
        """The attacker's only access to the victim (opened on first use, charged what earlier runs bought)."""
        return self._oracle if self._oracle is not None else self.open_oracle(spent=self._prepaid)

    def open_oracle(self, spent: int) -> BlackBoxOracle:
        """Put the victim behind the oracle, charging ``spent`` queries an earlier run already paid for."""
        if self._oracle is not None:
            raise RuntimeError("the oracle is already open; an attack gets exactly one")
        self._oracle = BlackBoxOracle(self._victim_to_serve, self.hparams.budget, self.hparams.label_only, spent=spent)
        self._victim_to_serve = None
        return self._oracle

    @property
    def queries_spent(self) -> int:
        """Queries the attack has bought so far, this run and earlier ones (without opening the oracle)."""
        return self._oracle.queries_spent if self._oracle is not None else self._prepaid

    def state_dict(self) -> dict[str, Any]:
        """Queries bought so far, saved in Lightning checkpoints: a resumed run is charged them again."""
        return {"queries_spent": self.queries_spent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._oracle is None:
            self._prepaid = max(self._prepaid, int(state.get("queries_spent", 0)))

    @property
    def cache_dir(self) -> Path:
        return Path(self.hparams.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is None:
            images, labels = load_images(self.hparams.dataset, self.hparams.root, train=False)
            images = images[: self.hparams.test_size]
            labels = labels[: self.hparams.test_size]
            x = images.float().div_(255)
            self.test_set = BatchTensorDataset(x, labels[: len(x)], victim_labels(self._victim_for_evaluation, x))
            self._victim_for_evaluation = None

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("the attack has no training data yet: setup('fit') has not run")
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return batch_loader(self.train_set, self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers,
                            generator=generator)

    def val_dataloader(self) -> DataLoader:
        """The victim's test set: monitoring only; nothing selects a checkpoint on it."""
        return batch_loader(self.test_set, max(self.hparams.batch_size, 256), num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader

    def cache_key(self, **attack: Any) -> str:
        """A short digest of everything that decides what the victim answers and what the attacker asks."""
        blob = json.dumps({"victim": self.victim_id, "label_only": self.hparams.label_only,
                           "seed": self.hparams.seed, **attack}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def load_attacker_images(self, name: str, train: bool = True, check_only: bool = False) -> tuple[Tensor, Tensor] | None:
        """uint8 images of another dataset converted to the victim's input shape, with their labels.

        ``check_only`` refuses an inconvertible dataset (from its registry entry) without loading it.
        """
        spec = get_spec(name)
        have, want = spec.input_shape[0], self.input_shape[0]
        if have != want and {have, want} != {1, 3}:
            raise ConfigError(
                f"surrogate {name!r} has {have}-channel images; the victim takes {want} channel(s) and only 1 <-> 3 "
                f"channel conversion exists. Choose a surrogate with {want} channel(s)."
            )
        if check_only:
            return None
        images, labels = load_images(name, self.hparams.root, train=train)
        return convert_images(images, self.input_shape), labels


def run_attack(
    datamodule: AttackDataModule,
    module: L.LightningModule,
    max_epochs: int,
    default_root_dir: str | None = None,
    logger: Any = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Fit the attacker, test the clone, and return the figures the field reports.

    The one implementation behind the CLI configs and the Python entry points (``run_knockoff`` ...):
    both build the same DataModule and LightningModule and let a Trainer run them. ``trainer_kwargs``
    (``accelerator``, ``devices``, ``precision``...) go to the Trainer.
    """
    trainer_kwargs.setdefault("devices", 1)
    trainer = L.Trainer(
        max_epochs=max_epochs, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=default_root_dir,
        num_sanity_val_steps=0, **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_time = time.perf_counter() - start
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    results = {
        "clone_acc": float(metrics["test/acc"]),
        "agreement": float(metrics["test/agreement"]),
        "queries": int(datamodule.oracle.queries_spent),
        "queries_this_run": int(datamodule.oracle.queries_spent - datamodule.oracle.resumed_from),
        "budget": int(datamodule.oracle.budget),
        "wall_time_s": round(fit_time, 2),
    }
    results.update(getattr(datamodule, "report", lambda: {})())
    results.update(getattr(module, "report", lambda: {})())
    return results


def require_single_process(trainer: L.Trainer, attack: str) -> None:
    """Refuse DDP for attacks that query inside their training loop: every process would spend the budget."""
    if trainer.world_size > 1:
        raise ConfigError(
            f"{attack} queries the victim inside its training loop: under DDP each of the {trainer.world_size} "
            f"processes would query on its own and spend the budget {trainer.world_size} times. Run it on one device "
            "(trainer.devices: 1). KnockoffNets buys its queries once, in prepare_data, and can use DDP."
        )


def victim_labels(victim: nn.Module | None, images: Tensor, batch_size: int = 1024) -> Tensor:
    """The victim's argmax on ``images`` (evaluation only: called directly, not through the oracle)."""
    if victim is None:
        raise RuntimeError("the victim's evaluation labels were already computed; the victim is no longer held")
    with torch.no_grad():
        return torch.cat([victim(part).argmax(dim=-1) for part in images.split(batch_size)])


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a killed run leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _build_victim(victim: VictimConfig | nn.Module) -> tuple[nn.Module, str]:
    """The victim model and an identity for cache keys (checkpoint digest and routing, or the weights' digest)."""
    if isinstance(victim, nn.Module):
        return victim.eval(), f"module:{type(victim).__name__}:{_state_digest(victim)}"
    if isinstance(victim, dict):
        victim = VictimConfig(**victim)
    if not isinstance(victim, VictimConfig):
        raise TypeError(f"victim must be a VictimConfig (checkpoint, router, ...) or a DefendedModel, got {type(victim).__name__}")
    model = victim.build()  # missing / foreign checkpoints fail here with the loader's message
    parts = [_file_digest(victim.checkpoint), victim.router, str(victim.member), victim.key]
    if victim.hash_checkpoint:
        parts.append(_file_digest(victim.hash_checkpoint))
    if victim.postprocessors:  # their settings and weights (surrogate, misinformation model) change every answer
        specs = json.dumps(victim.postprocessors, sort_keys=True, default=str)
        parts.append(hashlib.sha256(specs.encode()).hexdigest()[:16] + "-" + _state_digest(model.postprocessors))
    return model, "ckpt:" + ":".join(parts)


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
