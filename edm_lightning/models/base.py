"""What this package's LightningModules share: their checkpoints say what they hold; and, for the single-net
ones, one net built by name, one optimiser, softmax predictions.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor
from typing_extensions import override

from edm_lightning.checkpoints import CLASS_KEY, check_structure
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig, build_optimizer

__all__ = ["NetModule", "RecordedModule"]


class RecordedModule(L.LightningModule):
    """A LightningModule whose checkpoints record its class (``checkpoints.CLASS_KEY``), whoever trains it.

    LightningCLI records ``_class_path`` in the hyper-parameters, the experiment runner does not; loaders
    that must refuse the wrong kind of checkpoint (a misinformation model as a victim) read this entry.
    """

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = type(self).__name__


class NetModule(RecordedModule):
    """One classifier net (``self.net``, images in [0, 1] to logits) and its optimiser.

    The base of the target and hash network (:class:`~edm_lightning.models.ClassifierModule`), the
    misinformation model and the attacker's clone (:class:`~edm_lightning.models.CloneModule`). Subclasses
    call ``self.save_hyperparameters()`` after ``super().__init__``, so their own arguments are saved too,
    and add their training and evaluation steps.

    Args:
        arch: architecture name (``lenet5``, ``small_cnn``, ``resnet18``, ``vgg16_bn``).
        num_classes: number of classes.
        input_shape: (channels, height, width) of the inputs.
        mean: per-channel normalisation mean (the net's first layer).
        std: per-channel normalisation std.
        optim: optimiser and schedule (default :class:`~edm_lightning.models.OptimConfig`).

    Raises:
        ConfigError: an unknown architecture, or a shape or statistics it cannot take.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        input_shape: tuple[int, int, int],
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        optim: OptimConfig | None,
    ):
        super().__init__()
        self.optim = optim or OptimConfig()
        self.net = build_net(arch, input_shape, num_classes, mean, std)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, C, H, W)`` in [0, 1]."""
        return self.net(x)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Probabilities ``(N, num_classes)`` for a batch of images (or ``(images, ...)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=-1)

    @override
    def configure_optimizers(self):
        return build_optimizer(self.net.parameters(), self.optim, self.trainer.max_epochs)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before any weight is copied, an ensemble's checkpoint or one of another architecture or shape."""
        saved = checkpoint.get("hyper_parameters") or {}
        if "num_members" in saved:
            raise ConfigError(f"the checkpoint is an EDM ensemble ({saved['num_members']} members); this model is a "
                              f"single {type(self).__name__}: use configs/edm.yaml for an ensemble")
        check_structure(saved, dict(self.hparams), ("arch", "num_classes", "input_shape"), type(self).__name__)
