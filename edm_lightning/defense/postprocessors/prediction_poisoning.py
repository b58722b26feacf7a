"""MAD (Orekondy et al., ICLR 2020, "Prediction Poisoning: Towards Defenses Against DNN Model Stealing
Attacks"): the defense and its solver.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.defense.postprocessors.base import POSTPROCESSORS, Postprocessor, check_classes, frozen_classifier
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net
from edm_lightning.seeding import seeded

__all__ = ["PredictionPoisoning", "mad_target"]


@POSTPROCESSORS.register()
class PredictionPoisoning(Postprocessor):
    """MAD, Maximizing Angular Deviation (Orekondy et al., ICLR 2020): poison the clone's gradient signal.

    A clone trained on answer ``y`` with cross-entropy follows ``-G^T y``, where ``G`` (K x D) stacks
    the gradients ``grad_w log F_k(x; w)`` of a *proxy*, the defender's stand-in for the attacker's clone
    (the paper calls it the surrogate; its default is a randomly initialised net). MAD answers ``y~`` that maximises the
    angle between ``G^T y~`` and ``G^T y`` (paper Eq. 5)::

        max_{y~ in simplex}  || G^T y~ / ||G^T y~|| - G^T y / ||G^T y|| ||^2
        s.t.                 ||y~ - y||_p <= epsilon     (utility constraint, p = 1 or 2)

    The objective is convex in ``y~`` so its maximum over the simplex lies at a vertex: the paper's
    "MAD-argmax" heuristic evaluates the K one-hot vertices and keeps the best ``y*`` (Sec. 4.3).
    The budget is then met on the segment from ``y`` to ``y*``: ``y~ = (1 - a) y + a y*`` with
    ``a = min(1, epsilon / ||y* - y||_p)``, the largest step inside the constraint (the authors'
    closed-form line search). ``y~`` is a convex combination of two distributions, hence valid.

    ``preserve_argmax`` is the paper's argmax-preserving variant: the candidate vertices are the
    uniform distributions over class sets containing the top-1 class ``c`` (with ``c`` up-weighted by
    1e-5 so it stays the strict argmax); ``y*`` and ``y`` share their top class, so ``y~`` does too and
    the defender's accuracy is untouched. All 2^(K-1) sets are searched for K <= 10; above, sets grow
    greedily one class at a time, as the authors' code does.

    Only the objective's Gram matrix ``G G^T`` (K x K per input) is needed, so the search is cheap.
    ``G`` is taken w.r.t. the proxy's last weight matrix (``gradient_params: last``, the authors'
    default) or all its parameters (``all``; memory grows with N * K * D).

    Args:
        epsilon: utility budget ``||y~ - y||_p`` (0: answers unchanged; at most 2 for l1, sqrt 2 for l2,
            the largest distance between two distributions).
        proxy: the defender's stand-in for the attacker's clone: an ``nn.Module`` returning logits,
            a classifier checkpoint path, or ``None`` for a fresh ``proxy_arch`` net seeded by ``seed``.
        norm: ``l1`` or ``l2`` distance of the utility constraint.
        preserve_argmax: search only perturbations that keep the top-1 label (MAD-argmax in the paper's tables).
        gradient_params: ``last`` (last weight matrix) or ``all`` parameters of the proxy.
        proxy_arch: architecture of the fresh proxy when ``proxy`` is ``None``.
        seed: initialisation seed of that fresh proxy.
        num_classes: the victim's class count (set by the victim loader): checked against the proxy.
        input_shape: the victim's input shape (set by the victim loader).
    """

    def __init__(
        self,
        epsilon: float,
        proxy: nn.Module | str | Path | None = None,
        norm: Literal["l1", "l2"] = "l1",
        preserve_argmax: bool = False,
        gradient_params: Literal["last", "all"] = "last",
        proxy_arch: str = "lenet5",
        seed: int = 0,
        num_classes: int | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if norm not in ("l1", "l2"):
            raise ConfigError(f"PredictionPoisoning: norm must be 'l1' or 'l2', got {norm!r}")
        limit = 2.0 if norm == "l1" else 2.0**0.5
        if not 0 <= epsilon <= limit:
            raise ConfigError(
                f"PredictionPoisoning: epsilon (the {norm} utility budget) must be in [0, {limit:.4g}] "
                f"(the largest {norm} distance between two distributions), got {epsilon!r}"
            )
        if gradient_params not in ("last", "all"):
            raise ConfigError(f"PredictionPoisoning: gradient_params must be 'last' or 'all', got {gradient_params!r}")
        if proxy is None:
            if num_classes is None or input_shape is None:
                raise ConfigError("PredictionPoisoning: a fresh proxy (proxy: null) needs num_classes and input_shape")
            with seeded(seed):
                proxy = build_net(proxy_arch, tuple(input_shape), int(num_classes))
        self.proxy = frozen_classifier(proxy, "PredictionPoisoning: proxy", num_classes, input_shape)
        names = [name for name, p in self.proxy.named_parameters() if gradient_params == "all" or p.ndim >= 2]
        if not names:
            raise ConfigError("PredictionPoisoning: the proxy has no weight matrix to take gradients of")
        self._gradient_names = names if gradient_params == "all" else names[-1:]
        self.epsilon, self.norm = float(epsilon), norm
        self.preserve_argmax, self.gradient_params = bool(preserve_argmax), gradient_params

    @override
    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.epsilon == 0 or x.shape[0] == 0:
            return probs
        gram = self.gram(x)
        check_classes(gram.shape[-1], probs.shape[-1], "PredictionPoisoning: proxy")
        y = probs.double()
        target = mad_target(gram, y, self.preserve_argmax)
        p = 1 if self.norm == "l1" else 2
        distance = torch.linalg.vector_norm(target - y, ord=p, dim=-1, keepdim=True)
        step = (self.epsilon / distance.clamp(min=1e-12)).clamp(max=1.0)
        return (y + step * (target - y)).to(probs.dtype)

    def gram(self, x: Tensor, chunk: int = 64) -> Tensor:
        """``G G^T`` per input ``(N, K, K)``, ``G`` the proxy's log-softmax Jacobian w.r.t. the chosen weights.

        Works inside ``no_grad`` and inference mode (a victim runs there): ``torch.func`` transforms
        differentiate regardless of the outer grad mode.

        Returns:
            ``G G^T`` ``(N, K, K)``, float64.
        """
        named = dict(self.proxy.named_parameters())
        params = {name: named[name].detach() for name in self._gradient_names}

        def log_probs(weights: dict[str, Tensor], xi: Tensor) -> Tensor:
            logits = torch.func.functional_call(self.proxy, weights, (xi.unsqueeze(0),))
            return logits.log_softmax(dim=-1).squeeze(0)

        jacobian = torch.func.vmap(torch.func.jacrev(log_probs), in_dims=(None, 0))
        grams = []
        with torch.inference_mode(False):
            for part in x.clone().split(chunk):
                g = torch.cat([j.flatten(2) for j in jacobian(params, part.clone()).values()], dim=2).double()
                grams.append(g @ g.transpose(1, 2))
        return torch.cat(grams)

    @override
    def extra_repr(self) -> str:
        return (f"epsilon={self.epsilon}, norm={self.norm!r}, preserve_argmax={self.preserve_argmax}, "
                f"gradient_params={self.gradient_params!r}")


def mad_target(gram: Tensor, y: Tensor, preserve_argmax: bool = False) -> Tensor:
    """MAD's vertex ``y*`` ``(N, K)``: the candidate maximising the angular deviation from ``y`` (paper Eq. 5).

    With ``M = G G^T`` the objective of a candidate ``v`` is ``2 - 2 cos(G^T v, G^T y)`` and
    ``cos = v^T M y / sqrt(v^T M v * y^T M y)``, so only ``M`` is needed.

    Returns:
        The chosen vertex per input ``(N, K)``, a probability vector.
    """
    k = y.shape[-1]
    if not preserve_argmax:
        candidates = torch.eye(k, dtype=y.dtype, device=y.device).expand(y.shape[0], k, k)
        return _best(candidates, gram, y)
    top = y.argmax(dim=-1)
    if k <= 10:
        subsets = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)), dtype=y.dtype, device=y.device)
        per_class = torch.stack([subsets[subsets[:, c] > 0] for c in range(k)])  # (K, 2^(K-1), K)
        return _best(_argmax_vertices(per_class[top], top), gram, y)
    chosen = nn.functional.one_hot(top, k).to(y.dtype)  # grow the class set greedily from {top}
    best = _argmax_vertices(chosen.unsqueeze(1), top)[:, 0]
    best_value = _deviation(best.unsqueeze(1), gram, y)[:, 0]
    for _ in range(k - 1):
        grown = (chosen.unsqueeze(1) + torch.eye(k, dtype=y.dtype, device=y.device)).clamp(max=1)  # (N, K, K)
        value = _deviation(_argmax_vertices(grown, top), gram, y).masked_fill(chosen > 0, -float("inf"))
        pick = value.argmax(dim=-1)
        chosen = grown[torch.arange(len(y)), pick]
        picked_value = value.gather(1, pick[:, None])[:, 0]
        better = picked_value > best_value
        best = torch.where(better[:, None], _argmax_vertices(chosen.unsqueeze(1), top)[:, 0], best)
        best_value = torch.maximum(best_value, picked_value)
    return best


def _best(candidates: Tensor, gram: Tensor, y: Tensor) -> Tensor:
    value = _deviation(candidates, gram, y)
    return candidates[torch.arange(len(y)), value.argmax(dim=-1)]


def _deviation(candidates: Tensor, gram: Tensor, y: Tensor) -> Tensor:
    """``|| G^T v/|G^T v| - G^T y/|G^T y| ||^2`` for candidates ``v`` ``(N, V, K)``: values ``(N, V)``."""
    my = torch.einsum("nkl,nl->nk", gram, y)
    vmy = torch.einsum("nvk,nk->nv", candidates, my)
    vmv = torch.einsum("nvk,nkl,nvl->nv", candidates, gram, candidates)
    ymy = (y * my).sum(dim=-1, keepdim=True)
    return 2 - 2 * vmy / (vmv * ymy).clamp(min=0).sqrt().clamp(min=1e-30)


def _argmax_vertices(sets: Tensor, top: Tensor) -> Tensor:
    """Uniform distributions over class sets ``(N, V, K)``, the top class up-weighted by 1e-5 (strict argmax)."""
    weights = sets + 1e-5 * nn.functional.one_hot(top, sets.shape[-1]).to(sets.dtype).unsqueeze(1)
    return weights / weights.sum(dim=-1, keepdim=True)
