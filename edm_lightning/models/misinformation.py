"""Adaptive Misinformation's misinformation model: a classifier trained to be confidently wrong."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import override

from edm_lightning.losses import misinformation_loss
from edm_lightning.models.classifier import ClassifierModule

__all__ = ["MisinformationModule"]


class MisinformationModule(ClassifierModule):
    """The misinformation function ``f_mis`` of Kariyappa and Qureshi (CVPR 2020), trained with ``-log(1 - p_true)``.

    Trained on the defender's in-distribution data, it puts its mass on wrong classes, so blending its
    answer into out-of-distribution queries (:class:`~edm_lightning.defense.AdaptiveMisinformation`)
    feeds an attacker labels that are wrong yet look like a classifier's. Same arguments and checkpoint
    layout as :class:`ClassifierModule` (``net.*``); ``train/acc`` / ``val/acc`` should fall to about 0
    and ``val/loss`` (monitored by ``configs/misinformation.yaml``) towards 0.
    """

    @override
    def criterion(self, logits: Tensor, y: Tensor) -> Tensor:
        return misinformation_loss(logits, y)
