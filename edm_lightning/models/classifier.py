"""The undefended target: one classifier trained with cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from edm_lightning.models.base import NetModule
from edm_lightning.models.step_logs import log_training_step
from edm_lightning.optim import OptimConfig

__all__ = ["ClassifierModule", "accuracy_metrics"]


class ClassifierModule(NetModule):
    """A single classifier: the undefended victim, and the hash network of EDM's neural router.

    ``num_classes``, ``input_shape``, ``mean`` and ``std`` are linked from the DataModule by the CLI.

    Args:
        arch: architecture name (``lenet5``, ``small_cnn``: the hash network's, ``resnet18``, ``vgg16_bn``).
        num_classes: number of classes.
        input_shape: (channels, height, width) of the inputs.
        mean: per-channel normalisation mean (the net's first layer).
        std: per-channel normalisation std.
        optim: optimiser and schedule.
    """

    def __init__(
        self,
        arch: str = "lenet5",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
    ):
        super().__init__(arch, num_classes, input_shape, mean, std, optim)
        self.save_hyperparameters()
        metrics = accuracy_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_metrics.update(logits, y)
        log_training_step(self, {"train/loss": loss})
        return loss

    @override
    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics)  # the epoch's training accuracy (computed and reset by Lightning)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def criterion(self, logits: Tensor, y: Tensor) -> Tensor:
        """The training loss (subclasses that learn another objective override it)."""
        return F.cross_entropy(logits, y)

    def _evaluate(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, split: str) -> None:
        x, y = batch
        logits = self(x)
        metrics(logits, y)
        self.log(f"{split}/loss", self.criterion(logits, y), sync_dist=True)
        self.log_dict(metrics, prog_bar=split == "val")


def accuracy_metrics(num_classes: int) -> MetricCollection:
    """Top-1 accuracy over all inputs (micro average), the figure the model-stealing literature reports.

    Inputs come from this package's own models, so torchmetrics' per-update argument checks are skipped.

    Returns:
        A collection with one metric, ``acc``.
    """
    return MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False)})
