"""Top-1 label only: the strongest rounding."""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.defense.postprocessors.base import POSTPROCESSORS, Postprocessor

__all__ = ["TopLabel"]


@POSTPROCESSORS.register()
class TopLabel(Postprocessor):
    """Answer the top-1 label only, as a one-hot probability vector (the strongest rounding).

    One-hot rather than an index keeps every answer the same shape, so it composes with the other
    post-processors and with the oracle like any probability answer.

    Example:
        >>> import torch
        >>> TopLabel()(None, torch.tensor([[0.64, 0.26, 0.10]]))
        tensor([[1., 0., 0.]])
    """

    @override
    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        return nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
