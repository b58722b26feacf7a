"""Reverse Sigmoid (Lee et al. 2019, "Defending Against NN Model Stealing Attacks Using Deceptive Perturbations")."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from typing_extensions import override

from edm_lightning.defense.postprocessors.base import POSTPROCESSORS, Postprocessor
from edm_lightning.errors import ConfigError

__all__ = ["ReverseSigmoid"]


@POSTPROCESSORS.register()
class ReverseSigmoid(Postprocessor):
    """Reverse Sigmoid (Lee et al. 2019, Eq. 3-4): a perturbation that misleads a clone's training.

    With ``s`` the sigmoid and ``s^-1`` the logit, each probability ``y_i`` is perturbed by::

        r_i = beta * (s(gamma * s^-1(y_i)) - 1/2)          (Eq. 3)
        y'  = alpha * (y - r)                              (Eq. 4, alpha normalises to sum 1)

    ``r`` is positive for ``y_i > 1/2`` and negative below, so the top class loses mass and the others
    gain it; the logits a clone recovers from ``y'`` point the wrong way. For ``beta`` above about 1,
    ``y - r`` can go negative: as in ART's implementation we clamp it to ``>= 0`` before ``alpha``
    (the paper leaves that case open). ``y`` is clamped to ``[1e-9, 1 - 1e-9]`` inside the logit only.
    For K >= 2 at least one entry stays positive (every ``y_i < 1/2`` gets ``r_i < 0``), so ``alpha``
    exists. Large ``beta`` can change the top-1 label: that is the accuracy cost of the defense.

    Args:
        beta: perturbation strength, >= 0 (0 answers unchanged).
        gamma: sigmoid slope, > 0 (the paper tunes it per dataset).

    Example:
        >>> ReverseSigmoid(beta=0.5)(None, torch.tensor([[0.64, 0.26, 0.10]], dtype=torch.float64))
        tensor([[0.4560, 0.3040, 0.2400]], dtype=torch.float64)
    """

    def __init__(self, beta: float, gamma: float = 1.0):
        super().__init__()
        if not 0 <= beta < math.inf:  # written so that NaN fails too
            raise ConfigError(f"ReverseSigmoid: beta (strength) must be a finite number >= 0, got {beta!r}")
        if not 0 < gamma < math.inf:
            raise ConfigError(f"ReverseSigmoid: gamma (sigmoid slope) must be a finite number > 0, got {gamma!r}")
        self.beta, self.gamma = float(beta), float(gamma)

    @override
    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        y = probs.double()
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(y, eps=1e-9)) - 0.5)
        perturbed = (y - r).clamp(min=0)
        return (perturbed / perturbed.sum(dim=-1, keepdim=True)).to(probs.dtype)

    @override
    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}"
