"""EDM's diversity objective: the coherence of an ensemble on an input, and its batch mean as a loss.

Kariyappa et al. (ICLR 2021) train the members to disagree on out-of-distribution inputs by minimising
the *coherence* of the ensemble: a smooth maximum (log-sum-exp) over member pairs ``i < j`` of the
cosine similarity ``CS(f_i(x), f_j(x))`` of their softmax vectors. Functional forms first (easy to
test, free of Lightning), then the ``nn.Module`` that calls them, as torchmetrics does.

Also here: :func:`misinformation_loss`, the objective of Adaptive Misinformation's misinformation model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

__all__ = [
    "DiversityLoss",
    "coherence",
    "diversity_loss",
    "max_pairwise_similarity",
    "misinformation_loss",
    "pairwise_similarity",
]


def coherence(probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-input coherence ``(batch,)`` of member probabilities ``probs`` shaped ``(members, batch, classes)``.

    The paper's smooth maximum is ``log sum_{i<j} exp(CS_ij)``. Over ``P = N(N-1)/2`` pairs that value
    lies in ``[max, max + log P]``, so identical members score ``1 + log P`` (3.30 for N = 5), not 1.
    We use the normalised, temperature-scaled form (a log-*mean*-exp)::

        coherence(x) = (logsumexp_{i<j}(t * CS_ij) - log P) / t

    which lies between the mean and the maximum of the pairwise similarities: exactly 1 when all
    members agree, exactly 0 when every pair is orthogonal (one-hot answers on different classes),
    and tends to the maximum as ``t`` grows. With ``t = 1`` it differs from the paper's value by the
    constant ``log P`` only, so its gradient (and hence training) is the paper's exactly.

    Returns:
        Coherence per input ``(batch,)``, in [0, 1] for probability inputs.

    Raises:
        ValueError: ``temperature`` not a finite number > 0.

    Example:
        >>> agree = torch.tensor([[[0.9, 0.1]], [[0.9, 0.1]], [[0.9, 0.1]]])  # 3 members, 1 input
        >>> coherence(agree)
        tensor([1.])
        >>> disagree = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
        >>> coherence(disagree).abs() < 1e-6
        tensor([True])
    """
    if not 0 < temperature < math.inf:  # written so that NaN fails too
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    sims = pairwise_similarity(probs)
    num_pairs = sims.shape[-1]
    return (torch.logsumexp(temperature * sims, dim=-1) - math.log(num_pairs)) / temperature


def diversity_loss(probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch mean of :func:`coherence`: the term EDM adds, weighted by lambda, on OOD batches."""
    return coherence(probs, temperature).mean()


def max_pairwise_similarity(probs: Tensor) -> Tensor:
    """Per-input maximum ``(batch,)`` of the pairwise cosine similarities: the exact (hard) coherence.

    The share of inputs where it exceeds 0.5 says how often at least two members still agree, which
    is what a re-querying attacker could exploit; it does not depend on a temperature.

    Returns:
        The largest pairwise cosine similarity per input ``(batch,)``.
    """
    return pairwise_similarity(probs).amax(dim=-1)


def pairwise_similarity(probs: Tensor) -> Tensor:
    """Cosine similarities ``(batch, P)`` of every member pair ``i < j`` (``P = N(N-1)/2``), in [0, 1] for probabilities."""
    if probs.ndim != 3:
        raise ValueError(f"probs must be shaped (members, batch, classes), got {tuple(probs.shape)}")
    members = probs.shape[0]
    if members < 2:
        raise ValueError(f"coherence needs at least 2 members, got {members}")
    unit = F.normalize(probs, dim=-1, eps=1e-12)
    gram = torch.einsum("ibc,jbc->bij", unit, unit)
    i, j = torch.triu_indices(members, members, offset=1, device=probs.device)
    return gram[:, i, j]


def misinformation_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch mean of ``-log(1 - p_true)`` (Kariyappa and Qureshi, CVPR 2020, Eq. 4): mass away from the true class.

    Computed as ``logsumexp(z) - logsumexp(z without the true class)``, i.e. ``-log sum_{k != y} p_k``,
    which stays finite where ``1 - p_true`` underflows.

    Returns:
        The batch mean, a scalar.

    Raises:
        ValueError: logits not ``(N, K)`` or targets not ``(N,)``.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, K) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    others = logits.scatter(1, targets[:, None], -float("inf"))
    return (torch.logsumexp(logits, dim=-1) - torch.logsumexp(others, dim=-1)).mean()


class DiversityLoss(nn.Module):
    """Module form of :func:`diversity_loss`, so the temperature lives with the model's other parts."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)

    @override
    def forward(self, probs: Tensor) -> Tensor:
        return diversity_loss(probs, self.temperature)

    @override
    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
