"""Rounded probabilities (Tramer et al., USENIX Security 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.defense.postprocessors.base import POSTPROCESSORS, Postprocessor
from edm_lightning.errors import ConfigError

__all__ = ["Rounding"]


@POSTPROCESSORS.register()
class Rounding(Postprocessor):
    """Round each probability to ``decimals`` places, then renormalise (Tramer et al., USENIX Sec. 2016).

    Renormalising keeps the answer a distribution (rounded values need not sum to 1), so the result
    is a multiple of ``10**-decimals`` only up to that rescaling. An answer that rounds to all zeros
    (possible only with ``decimals = 0`` and ``max p < 0.5``) becomes its top-1 label.

    Args:
        decimals: places kept, >= 0 (0 keeps only probabilities >= 0.5).

    Example:
        >>> Rounding(decimals=1)(None, torch.tensor([[0.64, 0.26, 0.10]]))
        tensor([[0.6000, 0.3000, 0.1000]])
    """

    def __init__(self, decimals: int = 2):
        super().__init__()
        if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
            raise ConfigError(f"Rounding: decimals must be an integer >= 0 (places kept), got {decimals!r}")
        self.decimals = decimals

    @override
    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        rounded = probs.round(decimals=self.decimals)
        total = rounded.sum(dim=-1, keepdim=True)
        top = nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        return torch.where(total > 0, rounded / total.clamp(min=torch.finfo(probs.dtype).tiny), top)

    @override
    def extra_repr(self) -> str:
        return f"decimals={self.decimals}"
