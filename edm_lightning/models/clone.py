"""The attacker's clone: a classifier trained on the victim's answers, judged on the victim's own test set."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from edm_lightning.errors import ConfigError
from edm_lightning.models.base import NetModule
from edm_lightning.models.step_logs import log_training_step
from edm_lightning.optim import OptimConfig

__all__ = ["CloneModule", "clone_loss", "clone_metrics"]


class CloneModule(NetModule):
    """A clone trained on (input, victim answer) pairs, evaluated by accuracy and agreement.

    Training batches are ``(x, target)``: ``target`` is either the victim's probability vectors
    ``(N, C)`` (soft labels, KnockoffNets' setting) or class indices ``(N,)`` (label-only victims).
    Evaluation batches are ``(x, label, victim_label)`` from the victim's in-distribution test set:
    ``acc`` is the clone's accuracy on the true labels, ``agreement`` the share of inputs where the
    clone's argmax equals the victim's (the fidelity figure of Jagielski et al. 2020). The victim's
    test-set labels are computed once by the data side with the victim directly; they are an
    evaluation, not attack queries, and the clone never sees the victim.

    ``num_classes``, ``input_shape``, ``mean`` and ``std`` are linked from the DataModule by the CLI
    (the victim's dataset: the attacker is assumed to know the task's input format and class count).

    Args:
        arch: clone architecture (``lenet5``, ``small_cnn``, ``resnet18``, ``vgg16_bn``).
        num_classes: number of classes of the victim.
        input_shape: (channels, height, width) of the victim's inputs.
        mean: per-channel normalisation mean (the net's first layer).
        std: per-channel normalisation std.
        optim: optimiser and schedule of the clone.
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
        metrics = clone_metrics(num_classes)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, target = batch
        loss = clone_loss(self(x), target)
        log_training_step(self, {"train/loss": loss})
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        queries = getattr(self.trainer.datamodule, "queries_spent", None)  # an attack's DataModule counts them
        if queries is not None:
            self.log("attack/queries", float(queries))

    @override
    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor], metrics: dict, split: str) -> None:
        x, label, victim_label = batch
        logits = self(x)
        metrics["acc"].update(logits, label)
        metrics["agreement"].update(logits, victim_label)
        self.log(f"{split}/loss", F.cross_entropy(logits, label), sync_dist=True)
        self.log_dict(metrics, prog_bar=split == "val")


def clone_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against the victim's answers: soft (probability vectors) or hard (class indices).

    With soft targets this is KnockoffNets' training loss, ``-sum_k y_k log softmax(z)_k``; one-hot
    targets (a label-only oracle) reduce it to the usual cross-entropy.

    Returns:
        The batch mean, a scalar.

    Raises:
        ConfigError: soft targets of another shape than the logits.
    """
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ConfigError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits, target)


def clone_metrics(num_classes: int) -> MetricCollection:
    """Clone accuracy on the true labels and agreement (argmax match) with the victim, both micro-averaged.

    Each is updated with its own target, so the collection is updated metric by metric.

    Returns:
        A collection of ``acc`` and ``agreement``.
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "agreement": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
        },
        compute_groups=False,
    )
