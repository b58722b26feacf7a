"""The line a job ends with: what it produced and where.

A fit's figures are otherwise only in a progress bar or in a logger's files, and its checkpoint's path is what the
config's ``ModelCheckpoint`` made of ``dirpath``. :class:`JobSummary` prints both, once, on rank zero, after the
last of Lightning's own output.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from typing_extensions import override

__all__ = ["JobSummary"]

#: The figures a line reports, by their name after the split's prefix (``val/``, ``test/``), in this order.
FIGURES = ("acc", "agreement")


class JobSummary(Callback):
    """Ends ``fit``, ``validate`` and ``test`` with one line: the model's figures, the split and number of images
    they are on, and the checkpoint, e.g. (each one line) ::

        fit: val/acc 89.2% on 5,000 validation images held out of fashionmnist's training split (best epoch, 9 of 10);
            checkpoint runs/baseline/checkpoints/best.ckpt
        fit: clone accuracy 81.2%, agreement with the victim 85.3% on 10,000 images of the victim's fashionmnist
            test split (last epoch, 20 of 20); 50,000 of 50,000 queries spent; clone checkpoint
            runs/attack/knockoff/checkpoints/last.ckpt

    An attack (a DataModule counting ``queries_spent``) validates its clone on the victim's test split (monitoring
    only: its checkpoint is the last epoch's, never one picked on that split); a victim is validated on images held
    out of its training split, and its checkpoint is the configured ``ModelCheckpoint``'s best, whose epoch's figures
    the line gives. The line is printed after Lightning's own output (the test table included) and only when the
    stage finished: a run that failed or was interrupted prints none.
    """

    def __init__(self) -> None:
        super().__init__()
        self._images = 0  # images of the first loader in the running evaluation (this process)
        self._validations: list[tuple[int, dict[str, float], int]] = []  # (epoch, figures, images) of each validation
        self._tested_images = 0

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images = 0

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images = 0

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:  # EDM's second loader is the OOD set, which no accuracy is measured on
            self._images += _batch_length(batch)

    @override
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._images += _batch_length(batch)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        images = _all_processes(trainer, pl_module, self._images)  # every process calls this hook: a collective is safe
        self._validations.append((trainer.current_epoch + 1, _figures(trainer, "val/"), images))

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tested_images = _all_processes(trainer, pl_module, self._images)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        if stage == "fit":
            line = self._fit_line(trainer)
        elif stage == "validate" and self._validations:
            _, figures, images = self._validations[-1]
            line = (f"validate: {_describe(figures, 'val/', _is_attack(trainer))} {_split(trainer, 'val/', images)}; "
                    f"checkpoint {_tested(trainer)}")
        elif stage == "test":
            line = (f"test: {_describe(_figures(trainer, 'test/'), 'test/', _is_attack(trainer))} "
                    f"{_split(trainer, 'test/', self._tested_images)}; checkpoint {_tested(trainer)}")
        else:
            return
        print(line, flush=True)

    def _fit_line(self, trainer: L.Trainer) -> str:
        """The fit's line: the kept checkpoint, the figures of the validation it was kept after, the queries spent."""
        attack = _is_attack(trainer)
        checkpoint = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        path = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint is not None else ""
        kept = (f"{'clone ' if attack else ''}checkpoint {_shown(path)}" if path else
                "no checkpoint kept (the trainer has no ModelCheckpoint, or it wrote none)")
        parts = ["no validation ran"]
        if self._validations:
            (epoch, figures, images), which, monitor = self._validations[-1], "last epoch", None
            if checkpoint is not None and checkpoint.monitor and checkpoint.best_model_path:
                best, monitor = float(checkpoint.best_model_score), checkpoint.monitor
                chosen = [v for v in self._validations if v[1].get(monitor) == best]  # the first: a tie is no improvement
                if chosen:
                    (epoch, figures, images), which = chosen[0], "best epoch"
                figures = {**figures, monitor: best}
            of = f" of {trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
            parts = [f"{_describe(figures, 'val/', attack, monitor)} {_split(trainer, 'val/', images)} ({which}, {epoch}{of})"]
        queries = getattr(trainer.datamodule, "queries_spent", None)
        if queries is not None:
            budget = _hparams(trainer).get("budget")
            parts.append(f"{queries:,} of {budget:,} queries spent" if budget else f"{queries:,} queries spent")
        return f"fit: {'; '.join(parts)}; {kept}"


def _batch_length(batch: Any) -> int:
    """How many images a batch holds: the first tensor's length (``x``, ``(x, y)``, ``(x, y, victim_label)``)."""
    while isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        return _batch_length(next(iter(batch.values())))
    return len(batch) if isinstance(batch, Tensor) else 0


def _all_processes(trainer: L.Trainer, pl_module: L.LightningModule, count: int) -> int:
    """``count`` summed over the processes (DDP shards the evaluation; each process counted its own)."""
    return int(trainer.strategy.reduce(torch.tensor(float(count), device=pl_module.device), reduce_op="sum"))


def _is_attack(trainer: L.Trainer) -> bool:
    """Whether the job is an attack: its DataModule counts the queries it bought (an attack's DataModule does)."""
    return getattr(trainer.datamodule, "queries_spent", None) is not None


def _figures(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """The logged figures of one split (``val/``, ``test/``) as plain numbers, by their logged names."""
    return {key: float(value) for key, value in trainer.callback_metrics.items()
            if key.startswith(prefix) and isinstance(value, (Tensor, float, int)) and torch.as_tensor(value).numel() == 1}


def _describe(figures: dict[str, float], prefix: str, attack: bool, monitor: str | None = None) -> str:
    """``val/acc 89.2%`` (a victim), ``clone accuracy 81.2%, agreement with the victim 85.3%`` (an attack), after the
    monitored figure when it is another (the misinformation model's ``val/loss 0.0123``).

    Returns:
        The figures as words.
    """
    words = {"acc": "clone accuracy", "agreement": "agreement with the victim"} if attack else {}
    said = [f"{monitor} {figures[monitor]:.4g}"] if monitor in figures and monitor.removeprefix(prefix) not in FIGURES else []
    said += [f"{words.get(name, prefix + name)} {figures[prefix + name]:.1%}" for name in FIGURES if prefix + name in figures]
    return ", ".join(said) or "no accuracy logged"


def _hparams(trainer: L.Trainer) -> Any:
    """The DataModule's saved arguments (``dataset``, ``budget``, ``val_size``), or an empty mapping."""
    hparams = getattr(trainer.datamodule, "hparams", None)
    return hparams if hasattr(hparams, "get") else {}


def _split(trainer: L.Trainer, prefix: str, images: int) -> str:
    """Which images the figures are on: the victim's test split for an attack (it validates on it too), else the
    images the DataModule holds out of its training split (``val_size``), or its test split.

    Returns:
        ``on <count> images of <split>``.
    """
    dataset = _hparams(trainer).get("dataset")
    if _is_attack(trainer):
        return f"on {images:,} images of the victim's {dataset + ' ' if dataset else ''}test split"
    of = f"{dataset}'s" if dataset else "the"
    if prefix == "val/" and _hparams(trainer).get("val_size"):
        return f"on {images:,} validation images held out of {of} training split"
    return f"on {images:,} images of {of} {'test' if prefix == 'test/' else 'validation'} split"


def _tested(trainer: L.Trainer) -> str:
    """The checkpoint a ``validate``/``test`` evaluated (``--ckpt_path``), or the weights the model was built with."""
    if trainer.ckpt_path:
        return _shown(trainer.ckpt_path)
    return "none (the model as built; give --ckpt_path to evaluate a checkpoint)"


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the current folder when it lies below it (Lightning makes checkpoint paths absolute)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative
