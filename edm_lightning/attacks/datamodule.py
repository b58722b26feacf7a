"""The victim side of every attack: the victim behind its oracle, and the test set that measures the clone.

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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from edm_lightning.attacks.oracle import (
    BadAnswers,
    BlackBoxOracle,
    Ledger,
    answer_problem,
    check_budget_covers_batch,
    victim_name,
)
from edm_lightning.attacks.purchase import DAMAGED, count_problem, load_record
from edm_lightning.attacks.registry import CACHE_DIR
from edm_lightning.attacks.remote import RemoteVictim, RemoteVictimConfig
from edm_lightning.data.datamodules import LinkedSpec
from edm_lightning.data.datasets import get_spec, require_fetched
from edm_lightning.data.images import BatchTensorDataset, batch_loader, check_convertible, convert_images, load_images
from edm_lightning.defense import Victim, VictimConfig
from edm_lightning.defense.detectors import DetectorConfig, DetectorStore, MonitoredVictim, open_store
from edm_lightning.errors import ConfigError
from edm_lightning.files import digest, file_digest, state_digest
from edm_lightning.routing import DEFAULT_ROUTER_KEY, as_secret, resolve_router_key, router_class, router_label

__all__ = ["AttackDataModule", "victim_labels"]


class AttackDataModule(LinkedSpec, L.LightningDataModule):
    """The victim behind an oracle, and the victim's test set (with the victim's labels) for evaluation.

    Everything that can be wrong with the input is checked in ``__init__``, before a query is spent:
    the victim checkpoint is loaded, its input shape and class count compared with ``dataset``, the
    budget compared with one query batch.

    Args:
        victim: the victim, as configs name it: a checkpoint with its router and post-processors
            (:class:`~edm_lightning.defense.VictimConfig`), or a prediction API's ``url``
            (:class:`~edm_lightning.attacks.remote.RemoteVictimConfig`). From Python an already built
            :class:`~edm_lightning.defense.Victim` is accepted too.
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
        victim: VictimConfig | RemoteVictimConfig,
        dataset: str = "fashionmnist",
        budget: int = 50_000,
        label_only: bool = False,
        root: str = "data",
        batch_size: int = 128,
        test_size: int | None = None,
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["victim"])
        self.spec = get_spec(dataset)
        for key, value in {"budget": budget, "batch_size": batch_size, "test_size": test_size}.items():
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        check_budget_covers_batch(budget, batch_size)
        victim_model, self._victim_id, detector = _build_victim(victim)  # the identity: hashed into cache names, never shown
        if tuple(victim_model.input_shape) != tuple(self.spec.input_shape) or victim_model.num_classes != self.spec.num_classes:
            raise ConfigError(
                f"the victim takes inputs {tuple(victim_model.input_shape)} with {victim_model.num_classes} classes, but "
                f"dataset {dataset!r} has {self.spec.input_shape} with {self.spec.num_classes}: name the victim's own dataset."
            )
        trained = getattr(victim_model, "trained_on", None)
        if trained is not None and trained != dataset:
            raise ConfigError(
                f"the victim's checkpoint was trained on {trained!r}, but the attack measures it on {dataset!r}: a "
                f"hash network or another dataset's model is not this task's victim. Name the victim trained on {dataset!r}."
            )
        self._victim_for_evaluation: nn.Module | None = victim_model  # dropped once the test labels exist
        self._victim_to_serve: nn.Module | None = victim_model  # handed to the oracle, then dropped
        self._detector = detector
        self._store: DetectorStore | None = None  # the defender's client histories, opened when first needed
        self._oracle: BlackBoxOracle | None = None
        self._prepaid = 0  # queries bought by an earlier run and read back from the cache
        self.train_set: BatchTensorDataset | None = None
        self.test_set: BatchTensorDataset | None = None

    @property
    def oracle(self) -> BlackBoxOracle:
        """The attacker's only access to the victim (opened on first use, charged what earlier runs bought)."""
        return self._oracle if self._oracle is not None else self.open_oracle(spent=self._prepaid)

    def open_oracle(self, spent: int, ledger: Ledger | None = None) -> BlackBoxOracle:
        """Put the victim behind the oracle, charging ``spent`` queries an earlier run already paid for (and writing
        every call to ``ledger``, when given).

        Returns:
            The oracle, the attack's only one.

        Raises:
            RuntimeError: the oracle is already open.
        """
        if self._oracle is not None:
            raise RuntimeError("the oracle is already open; an attack gets exactly one")
        victim = self._victim_to_serve
        if self._detector is not None:  # this attack is one client of the defender's detector, named by what it buys
            victim = MonitoredVictim(victim, self._detector, self.detector_store(), self.client_key())
        self._oracle = BlackBoxOracle(victim, self.hparams.budget, self.hparams.label_only, spent=spent, ledger=ledger)
        self._victim_to_serve = None
        return self._oracle

    def charge_lost(self, queries: int) -> None:
        """Charge ``queries`` a killed run may have been answered (a pending record found): before the oracle opens,
        as queries bought earlier; after, to the oracle (up to its budget).
        """
        if self._oracle is None:
            self._prepaid += queries
        else:
            self._oracle.charge(queries)

    def read_round(self, path: Path, items_key: str, items_problem: Callable[[object], str | None]) -> tuple[Tensor, Tensor, int]:
        """What an earlier run bought in one round (JBDA's points, ActiveThief's pool picks), read back from ``path`` and
        checked like input from outside: a damaged file could otherwise feed the clone wrong answers, or let the attack
        buy past its budget.

        Args:
            path: the round's file, ``{items_key: items, "answers": answers to the first items, "lost": queries}``.
            items_key: the key of the round's items.
            items_problem: what is wrong with the items (``None``: nothing).

        Returns:
            ``(items, answers (k, num_classes) to the first k items, lost queries)``.

        Raises:
            ConfigError: the file is unreadable or its contents do not fit together; the message names it.
        """
        blob = load_record(path, "round of bought answers", (items_key, "answers"))
        items, answers, lost = blob[items_key], blob["answers"], blob.get("lost", 0)
        problem = count_problem({"lost": lost}, ("lost",)) or items_problem(items)
        if problem is None:
            rows = len(answers) if isinstance(answers, Tensor) and answers.ndim else 0
            problem = (f"{rows} answers for a round of {len(items)} queries" if rows > len(items)
                       else answer_problem(answers, rows, self.num_classes))
        if problem is not None:
            raise ConfigError(f"{str(path)!r} is not a whole round of bought answers ({problem}); {DAMAGED}")
        return items, answers, lost

    def client_key(self) -> str:
        """The name the victim's detector knows this attack by: one per purchase.

        Returns:
            A digest of the attack's settings (the budget aside: the budgets of one attack buy one stream) and, once a
            Trainer runs it, its attacker module's; an attack whose budgets share one purchase names that purchase.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        attacker = {"module": type(module).__name__, "settings": dict(module.hparams)} if module is not None else {}
        return self.cache_key(**{k: v for k, v in self.hparams.items() if k not in NOT_CLIENT}, **attacker)

    def detector_store(self) -> DetectorStore:
        """The victim's detector's client histories, beside this attack's caches (one store per victim).

        Returns:
            The store (``detector.state``, or ``<cache_dir>/defender/prada-<victim digest>.sqlite``).

        Raises:
            RuntimeError: the victim has no detector.
        """
        if self._detector is None:
            raise RuntimeError("the victim has no detector")
        if self._store is None:
            default = self.cache_dir / "defender" / f"prada-{digest(self._victim_id, length=16)}.sqlite"
            self._store = open_store(self._detector, default)
        return self._store

    def detector_figures(self) -> dict[str, Any]:
        """What the victim's detector saw of this attack's queries (empty without a detector).

        Returns:
            ``flagged_at`` (the query that flagged this attack, ``None``: none of its queries) and ``detector_queries``
            (how many of its queries the detector saw), both within the queries this attack has bought (a smaller
            budget reading a prefix of a larger purchase reports only its prefix).
        """
        if self._detector is None:
            return {}
        seen = self.detector_store().clients().get(self.client_key(), {"queries": 0, "flagged_at": None})
        flagged = seen["flagged_at"] if seen["flagged_at"] is not None and seen["flagged_at"] <= self.queries_spent else None
        return {"flagged_at": flagged, "detector_queries": min(seen["queries"], self.queries_spent)}

    @property
    def queries_spent(self) -> int:
        """Queries the attack has bought so far, this run and earlier ones (without opening the oracle)."""
        return self._oracle.queries_spent if self._oracle is not None else self._prepaid

    def state_dict(self) -> dict[str, Any]:
        """Queries bought so far, saved in Lightning checkpoints: a resumed run is charged them again."""
        return {"queries_spent": self.queries_spent}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        problem = count_problem({"queries_spent": 0, **state} if isinstance(state, dict) else state, ("queries_spent",))
        if problem is not None:
            raise ConfigError(f"the checkpoint's attack state is not one this package wrote ({problem}); resume from "
                              "another checkpoint of the attack")
        if self._oracle is None:
            self._prepaid = max(self._prepaid, state["queries_spent"] if "queries_spent" in state else 0)

    @property
    def cache_dir(self) -> Path:
        """Where this attack keeps what it bought (``cache_dir``)."""
        return Path(self.hparams.cache_dir)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.test_set is None:
            surrogate = self.hparams.get("surrogate")  # the pool-based attacks' natural images (train split)
            if surrogate:  # both named at once when both are missing
                require_fetched([surrogate, self.hparams.dataset], self.hparams.root)
            images, labels = load_images(self.hparams.dataset, self.hparams.root, train=False)
            images = images[: self.hparams.test_size]
            labels = labels[: self.hparams.test_size]
            x = images.float().div_(255)
            self.test_set = BatchTensorDataset(x, labels[: len(x)], victim_labels(self._victim_for_evaluation, x))
            self._victim_for_evaluation = None

    @override
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
        return digest({"victim": self._victim_id, "label_only": self.hparams.label_only,
                       "seed": self.hparams.seed, **attack}, length=16, separators=(", ", ": "))

    def load_attacker_images(self, name: str, train: bool = True, check_only: bool = False) -> tuple[Tensor, Tensor] | None:
        """uint8 images of another dataset converted to the victim's input shape, with their labels.

        ``check_only`` refuses an inconvertible dataset (from its registry entry) without loading it.

        Returns:
            ``(images, labels)``: uint8 ``(N, *input_shape)`` and int64 ``(N,)``; ``None`` with ``check_only``.

        Raises:
            ConfigError: the dataset's channels cannot be converted to the victim's.
        """
        check_convertible(get_spec(name).input_shape[0], self.input_shape[0], f"surrogate {name!r} images")
        if check_only:
            return None
        images, labels = load_images(name, self.hparams.root, train=train)
        return convert_images(images, self.input_shape), labels


def victim_labels(victim: nn.Module | None, images: Tensor, batch_size: int = 1024) -> Tensor:
    """The victim's argmax on ``images`` (evaluation only: called directly, not through the oracle), its answers checked
    as the oracle checks them.

    Returns:
        The labels ``(N,)``.

    Raises:
        RuntimeError: the labels were computed already (the victim is no longer held).
        BadAnswers: the victim's answers are not one probability vector per image (the message names it).
    """
    if victim is None:
        raise RuntimeError("the victim's evaluation labels were already computed; the victim is no longer held")
    labels = []
    with torch.no_grad():
        for part in images.split(batch_size):
            answers = victim(part)
            problem = answer_problem(answers, len(part), int(victim.num_classes))
            if problem is not None:
                raise BadAnswers(f"{victim_name(victim)} answered the evaluation images with unusable answers: {problem}. "
                                 "Check the victim before measuring a clone against it", len(part))
            labels.append(answers.argmax(dim=-1))
    return torch.cat(labels)


#: Attack settings that do not make another client of a detector: the budgets of one purchase are one client.
NOT_CLIENT = ("budget", "cache_dir", "root", "num_workers", "test_size")


def _build_victim(victim: VictimConfig | RemoteVictimConfig | Victim | dict
                  ) -> tuple[nn.Module | RemoteVictim, str, DetectorConfig | None]:
    """The victim model, an identity for cache keys (checkpoint digest and routing, the weights' digest, or the
    served model's identity) and its detector.

    Returns:
        ``(victim, identity, detector or None)``.

    Raises:
        TypeError: ``victim`` is none of the accepted kinds.
    """
    if isinstance(victim, nn.Module):
        return victim.eval(), f"module:{type(victim).__name__}:{state_digest(victim)}", None
    if isinstance(victim, dict):
        victim = RemoteVictimConfig(**victim) if "url" in victim else VictimConfig(**victim)
    if isinstance(victim, RemoteVictimConfig):
        remote = victim.build()
        return remote, f"remote:{remote.model_id}", None
    if not isinstance(victim, VictimConfig):
        raise TypeError(f"victim must be a VictimConfig (checkpoint, router, ...), a RemoteVictimConfig (url) or a Victim, "
                        f"got {type(victim).__name__}")
    model = victim.build()  # missing / foreign checkpoints fail here with the loader's message
    # The key is only hashed into cache names (as it always was: caches bought by earlier runs keep their names).
    keyed = router_class(victim.router).keyed
    key = resolve_router_key(victim.key) if keyed else (victim.key or as_secret(DEFAULT_ROUTER_KEY))
    key = key.decode("latin-1") if isinstance(key, bytes) else key.get_secret_value()
    parts = [file_digest(victim.checkpoint), router_label(victim.router), str(victim.member), key]  # a bare name as ever
    if victim.hash_checkpoint:
        parts.append(file_digest(victim.hash_checkpoint))
    if victim.postprocessors:  # their settings and weights (MAD's proxy, misinformation model) change every answer
        parts.append(digest(victim.postprocessors, length=16) + "-" + state_digest(model.postprocessors))
    if victim.detector is not None:  # a flagged client's answers differ: its purchases are another victim's
        parts.append("detector-" + digest(victim.detector.identity(), length=16))
    return model, "ckpt:" + ":".join(parts), victim.detector
