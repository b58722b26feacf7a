"""Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020, "Defending Against Model Stealing Attacks
with Adaptive Misinformation").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.defense.postprocessors.base import POSTPROCESSORS, Postprocessor, check_classes, frozen_classifier
from edm_lightning.errors import ConfigError

__all__ = ["AdaptiveMisinformation"]


@POSTPROCESSORS.register()
class AdaptiveMisinformation(Postprocessor):
    """Adaptive Misinformation (Kariyappa and Qureshi, CVPR 2020): wrong answers for out-of-distribution queries.

    Attack queries are mostly out-of-distribution, and a classifier is less confident on them. The
    defense detects them by the maximum softmax probability (Hendrycks and Gimpel 2017) and blends in
    a *misinformation* model's answer, smoothly (paper Eq. 5-6)::

        a  = sigmoid(nu * (tau - max_k y_k))     (about 0 for confident, in-distribution queries)
        y' = (1 - a) * y + a * y_mis,   y_mis = softmax(f_mis(x))

    ``f_mis`` is trained to put its mass on wrong classes, loss ``-log(1 - p_true)`` on the defender's
    training data (paper Eq. 4; :class:`~edm_lightning.models.MisinformationModule`,
    ``configs/misinformation.yaml``). ``y'`` is a convex combination of two distributions, hence valid.

    Args:
        tau: OOD threshold on the maximum probability, in [0, 1]; raising it misinforms more queries
            (also more benign ones), the defense's strength.
        nu: sharpness of the switch, > 0 (large, e.g. 1000: nearly a hard threshold at tau).
        misinformation_model: an ``nn.Module`` returning logits or a checkpoint path of a
            ``MisinformationModule``; it must have the victim's class count.
        num_classes: the victim's class count (set by the victim loader): checked against the model.
        input_shape: the victim's input shape (set by the victim loader).
    """

    def __init__(
        self,
        tau: float,
        nu: float,
        misinformation_model: nn.Module | str | Path,
        num_classes: int | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if not 0 <= tau <= 1:
            raise ConfigError(f"AdaptiveMisinformation: tau (threshold on the max probability) must be in [0, 1], got {tau!r}")
        if not 0 < nu < math.inf:
            raise ConfigError(f"AdaptiveMisinformation: nu (sharpness) must be a finite number > 0, got {nu!r}")
        self.misinformation_model = frozen_classifier(misinformation_model, "AdaptiveMisinformation: misinformation_model",
                                                num_classes, input_shape)
        self.tau, self.nu = float(tau), float(nu)

    @override
    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return probs
        misinformation = self.misinformation_model(x).softmax(dim=-1)
        check_classes(misinformation.shape[-1], probs.shape[-1], "AdaptiveMisinformation: misinformation_model")
        a = self.blend_weight(probs)
        return ((1 - a) * probs.double() + a * misinformation.double()).to(probs.dtype)

    def blend_weight(self, probs: Tensor) -> Tensor:
        """``a = sigmoid(nu * (tau - max p))`` per answer ``(N, 1)``: the share of misinformation.

        Returns:
            ``a`` ``(N, 1)`` in [0, 1], float64.

        Example:
            >>> defense = AdaptiveMisinformation(tau=0.5, nu=1000.0, misinformation_model=nn.Linear(4, 3))
            >>> defense.blend_weight(torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])).round(decimals=3)
            tensor([[0.],
                    [1.]], dtype=torch.float64)
        """
        return torch.sigmoid(self.nu * (self.tau - probs.double().amax(dim=-1, keepdim=True)))

    @override
    def extra_repr(self) -> str:
        return f"tau={self.tau}, nu={self.nu}"
