"""Output-perturbation defenses: post-processors that change a served model's answers, never its weights.

Each is an ``nn.Module`` called as ``probs = post(x, probs)`` by
:class:`~edm_lightning.defense.DefendedModel` after routing, so the same defense applies to an
undefended target and to an EDM ensemble, and several compose in a configured order
(:class:`~edm_lightning.defense.VictimConfig` ``postprocessors``). Every one

* checks its strength parameter at construction (:class:`~edm_lightning.errors.ConfigError` naming the
  expected range), and
* returns valid probability vectors: non-negative rows that sum to 1 (within float rounding).

The defenses (the peers EDM is compared with and composed with):

* :class:`TopLabel` - the top-1 label only, as a one-hot vector.
* :class:`Rounding` - probabilities rounded to ``decimals`` places (Tramer et al. 2016).
* :class:`ReverseSigmoid` - Lee et al. 2019, "Defending Against NN Model Stealing Attacks Using
  Deceptive Perturbations".
* :class:`PredictionPoisoning` - MAD, Orekondy et al., ICLR 2020, "Prediction Poisoning: Towards
  Defenses Against DNN Model Stealing Attacks".
* :class:`AdaptiveMisinformation` - Kariyappa and Qureshi, CVPR 2020, "Defending Against Model Stealing
  Attacks with Adaptive Misinformation".
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from edm_lightning.defense.checkpoints import load_classifier_net
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net

__all__ = [
    "POSTPROCESSORS",
    "AdaptiveMisinformation",
    "PredictionPoisoning",
    "ReverseSigmoid",
    "Rounding",
    "TopLabel",
    "build_postprocessor",
    "build_postprocessors",
]


class TopLabel(nn.Module):
    """Answer the top-1 label only, as a one-hot probability vector (the strongest rounding).

    One-hot rather than an index keeps every answer the same shape, so it composes with the other
    post-processors and with the oracle like any probability answer.
    """

    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        return nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)


class Rounding(nn.Module):
    """Round each probability to ``decimals`` places, then renormalise (Tramer et al., USENIX Sec. 2016).

    Renormalising keeps the answer a distribution (rounded values need not sum to 1), so the result
    is a multiple of ``10**-decimals`` only up to that rescaling. An answer that rounds to all zeros
    (possible only with ``decimals = 0`` and ``max p < 0.5``) becomes its top-1 label.

    Args:
        decimals: places kept, >= 0 (0 keeps only probabilities >= 0.5).
    """

    def __init__(self, decimals: int = 2):
        super().__init__()
        if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
            raise ConfigError(f"Rounding: decimals must be an integer >= 0 (places kept), got {decimals!r}")
        self.decimals = decimals

    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        rounded = probs.round(decimals=self.decimals)
        total = rounded.sum(dim=-1, keepdim=True)
        top = nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        return torch.where(total > 0, rounded / total.clamp(min=torch.finfo(probs.dtype).tiny), top)

    def extra_repr(self) -> str:
        return f"decimals={self.decimals}"


class ReverseSigmoid(nn.Module):
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
    """

    def __init__(self, beta: float, gamma: float = 1.0):
        super().__init__()
        if not beta >= 0:
            raise ConfigError(f"ReverseSigmoid: beta (strength) must be >= 0, got {beta!r}")
        if not gamma > 0:
            raise ConfigError(f"ReverseSigmoid: gamma (sigmoid slope) must be > 0, got {gamma!r}")
        self.beta, self.gamma = float(beta), float(gamma)

    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        y = probs.double()
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(y, eps=1e-9)) - 0.5)
        perturbed = (y - r).clamp(min=0)
        return (perturbed / perturbed.sum(dim=-1, keepdim=True)).to(probs.dtype)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}"


class PredictionPoisoning(nn.Module):
    """MAD, Maximizing Angular Deviation (Orekondy et al., ICLR 2020): poison the clone's gradient signal.

    A clone trained on answer ``y`` with cross-entropy follows ``-G^T y``, where ``G`` (K x D) stacks
    the gradients ``grad_w log F_k(x; w)`` of a *surrogate* of the attacker's model (the defender's
    own net; the paper's default is a randomly initialised one). MAD answers ``y~`` that maximises the
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
    ``G`` is taken w.r.t. the surrogate's last weight matrix (``gradient_params: last``, the authors'
    default) or all its parameters (``all``; memory grows with N * K * D).

    Args:
        epsilon: utility budget ``||y~ - y||_p`` (0: answers unchanged; at most 2 for l1, sqrt 2 for l2,
            the largest distance between two distributions).
        surrogate: the defender's surrogate of the attacker's model: an ``nn.Module`` returning logits,
            a classifier checkpoint path, or ``None`` for a fresh ``surrogate_arch`` net seeded by ``seed``.
        norm: ``l1`` or ``l2`` distance of the utility constraint.
        preserve_argmax: search only perturbations that keep the top-1 label (MAD-argmax in the paper's tables).
        gradient_params: ``last`` (last weight matrix) or ``all`` parameters of the surrogate.
        surrogate_arch: architecture of the fresh surrogate when ``surrogate`` is ``None``.
        seed: initialisation seed of that fresh surrogate.
        num_classes: the served model's class count (set by the victim loader): checked against the surrogate.
        input_shape: the served model's input shape (set by the victim loader).
    """

    def __init__(
        self,
        epsilon: float,
        surrogate: nn.Module | str | None = None,
        norm: Literal["l1", "l2"] = "l1",
        preserve_argmax: bool = False,
        gradient_params: Literal["last", "all"] = "last",
        surrogate_arch: str = "lenet5",
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
        if surrogate is None:
            if num_classes is None or input_shape is None:
                raise ConfigError("PredictionPoisoning: a fresh surrogate (surrogate: null) needs num_classes and input_shape")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                surrogate = build_net(surrogate_arch, tuple(input_shape), int(num_classes))
        self.surrogate = _classifier(surrogate, "PredictionPoisoning: surrogate", num_classes, input_shape)
        names = [name for name, p in self.surrogate.named_parameters() if gradient_params == "all" or p.ndim >= 2]
        if not names:
            raise ConfigError("PredictionPoisoning: the surrogate has no weight matrix to take gradients of")
        self._gradient_names = names if gradient_params == "all" else names[-1:]
        self.epsilon, self.norm = float(epsilon), norm
        self.preserve_argmax, self.gradient_params = bool(preserve_argmax), gradient_params

    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        if self.epsilon == 0 or x.shape[0] == 0:
            return probs
        gram = self.gram(x)
        _check_classes(gram.shape[-1], probs.shape[-1], "PredictionPoisoning: surrogate")
        y = probs.double()
        target = mad_target(gram, y, self.preserve_argmax)
        p = 1 if self.norm == "l1" else 2
        distance = torch.linalg.vector_norm(target - y, ord=p, dim=-1, keepdim=True)
        step = (self.epsilon / distance.clamp(min=1e-12)).clamp(max=1.0)
        return (y + step * (target - y)).to(probs.dtype)

    def gram(self, x: Tensor, chunk: int = 64) -> Tensor:
        """``G G^T`` per input ``(N, K, K)``, ``G`` the surrogate's log-softmax Jacobian w.r.t. the chosen weights.

        Works inside ``no_grad`` and inference mode (a served model runs there): ``torch.func`` transforms
        differentiate regardless of the outer grad mode.
        """
        named = dict(self.surrogate.named_parameters())
        params = {name: named[name].detach() for name in self._gradient_names}

        def log_probs(weights: dict[str, Tensor], xi: Tensor) -> Tensor:
            logits = torch.func.functional_call(self.surrogate, weights, (xi.unsqueeze(0),))
            return logits.log_softmax(dim=-1).squeeze(0)

        jacobian = torch.func.vmap(torch.func.jacrev(log_probs), in_dims=(None, 0))
        grams = []
        with torch.inference_mode(False):
            for part in x.clone().split(chunk):
                g = torch.cat([j.flatten(2) for j in jacobian(params, part.clone()).values()], dim=2).double()
                grams.append(g @ g.transpose(1, 2))
        return torch.cat(grams)

    def extra_repr(self) -> str:
        return (f"epsilon={self.epsilon}, norm={self.norm!r}, preserve_argmax={self.preserve_argmax}, "
                f"gradient_params={self.gradient_params!r}")


class AdaptiveMisinformation(nn.Module):
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
            ``MisinformationModule``; it must have the served model's class count.
        num_classes: the served model's class count (set by the victim loader): checked against the model.
        input_shape: the served model's input shape (set by the victim loader).
    """

    def __init__(
        self,
        tau: float,
        nu: float,
        misinformation_model: nn.Module | str,
        num_classes: int | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if not 0 <= tau <= 1:
            raise ConfigError(f"AdaptiveMisinformation: tau (threshold on the max probability) must be in [0, 1], got {tau!r}")
        if not nu > 0:
            raise ConfigError(f"AdaptiveMisinformation: nu (sharpness) must be > 0, got {nu!r}")
        self.misinformation_model = _classifier(misinformation_model, "AdaptiveMisinformation: misinformation_model",
                                                num_classes, input_shape)
        self.tau, self.nu = float(tau), float(nu)

    def forward(self, x: Tensor, probs: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return probs
        misinformation = self.misinformation_model(x).softmax(dim=-1)
        _check_classes(misinformation.shape[-1], probs.shape[-1], "AdaptiveMisinformation: misinformation_model")
        a = self.blend_weight(probs)
        return ((1 - a) * probs.double() + a * misinformation.double()).to(probs.dtype)

    def blend_weight(self, probs: Tensor) -> Tensor:
        """``a = sigmoid(nu * (tau - max p))`` per answer ``(N, 1)``: the share of misinformation."""
        return torch.sigmoid(self.nu * (self.tau - probs.double().amax(dim=-1, keepdim=True)))

    def extra_repr(self) -> str:
        return f"tau={self.tau}, nu={self.nu}"


POSTPROCESSORS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (TopLabel, Rounding, ReverseSigmoid, PredictionPoisoning, AdaptiveMisinformation)
}


def build_postprocessors(
    specs: Sequence[dict[str, Any]], num_classes: int, input_shape: tuple[int, int, int]
) -> list[nn.Module]:
    """The post-processors ``specs`` describe, in order (see :func:`build_postprocessor`)."""
    return [build_postprocessor(spec, num_classes, input_shape, position=i) for i, spec in enumerate(specs)]


def build_postprocessor(
    spec: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int], position: int = 0
) -> nn.Module:
    """One post-processor from ``{"class_path": ..., "init_args": {...}}``, as LightningCLI configs write classes.

    ``class_path`` is a name of :data:`POSTPROCESSORS` (``ReverseSigmoid``) or a dotted path to any
    ``nn.Module`` with ``forward(x, probs)``. The served model's ``num_classes`` and ``input_shape``
    are passed to classes that take them, as LightningCLI links data to model: a config never types
    them, and a value that disagrees with the served model is refused.
    """
    cls, init_args = resolve_postprocessor(spec, position)
    signature = inspect.signature(cls)
    where = f"postprocessors[{position}] ({cls.__name__})"
    for key, value in (("num_classes", int(num_classes)), ("input_shape", tuple(input_shape))):
        if key not in signature.parameters:
            continue
        given = init_args.get(key)
        if given is not None and (tuple(given) if key == "input_shape" else int(given)) != value:
            raise ConfigError(f"{where}: {key}={given!r} but the served model has {key}={value!r}; leave it out")
        init_args[key] = value
    try:
        signature.bind(**init_args)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}. Its arguments: {', '.join(signature.parameters)}") from None
    return cls(**init_args)


def resolve_postprocessor(spec: Any, position: int = 0) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and a copy of the init args a spec names; a malformed spec fails with what was expected."""
    where = f"postprocessors[{position}]"
    if not isinstance(spec, dict) or "class_path" not in spec or not set(spec) <= {"class_path", "init_args"}:
        raise ConfigError(
            f"{where} must be a mapping with class_path (one of {', '.join(POSTPROCESSORS)} or a dotted path) "
            f"and optional init_args, got {spec!r}"
        )
    path, init_args = str(spec["class_path"]), spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ConfigError(f"{where}: init_args must be a mapping of argument names to values, got {init_args!r}")
    cls = POSTPROCESSORS.get(path.removeprefix(f"{__name__}."))
    if cls is None and "." in path:
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"{where}: unknown post-processor {path!r}. Known: {', '.join(POSTPROCESSORS)} "
            "(or a dotted path to an nn.Module taking (x, probs))."
        )
    return cls, dict(init_args)


def mad_target(gram: Tensor, y: Tensor, preserve_argmax: bool = False) -> Tensor:
    """MAD's vertex ``y*`` ``(N, K)``: the candidate maximising the angular deviation from ``y`` (paper Eq. 5).

    With ``M = G G^T`` the objective of a candidate ``v`` is ``2 - 2 cos(G^T v, G^T y)`` and
    ``cos = v^T M y / sqrt(v^T M v * y^T M y)``, so only ``M`` is needed.
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


def _classifier(model: nn.Module | str | Path, what: str, num_classes: int | None,
                input_shape: tuple[int, int, int] | None) -> nn.Module:
    """A frozen classifier from a module or checkpoint path; a class count other than the served model's fails now."""
    if isinstance(model, (str, Path)):
        net, hp, _ = load_classifier_net(model, what)
        have_classes, have_shape = int(hp["num_classes"]), tuple(hp["input_shape"])
        if input_shape is not None and have_shape != tuple(input_shape):
            raise ConfigError(f"{what} {str(model)!r} takes inputs {have_shape}, the served model {tuple(input_shape)}")
    elif isinstance(model, nn.Module):
        net = model.eval().requires_grad_(False)
        have_classes = None
        if input_shape is not None:
            with torch.no_grad():
                have_classes = int(net(torch.zeros(1, *input_shape)).shape[-1])
    else:
        raise ConfigError(f"{what} must be an nn.Module or a checkpoint path, got {type(model).__name__}")
    if num_classes is not None and have_classes is not None:
        _check_classes(have_classes, int(num_classes), what, error=ConfigError)
    return net


def _check_classes(have: int, want: int, what: str, error: type[Exception] = ValueError) -> None:
    if have != want:
        raise error(f"{what} predicts {have} classes but the served model {want}: train it on the victim's task")
