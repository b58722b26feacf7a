"""D-DAE's shadow kit (Chen et al., IEEE S&P 2023, Sec. IV): shadow models with and without each candidate defense,
the meta-classifier that names the defense from answers alone, and one restorer per defense.

The attacker holds a small share of the victim task's training data. It trains ``shadows`` undefended classifiers
on it (different seeds), and for every candidate defense the defended version of each: an output post-processor
(this project's own classes, applied to the shadow's answers, as a :class:`~edm_lightning.defense.Victim` serves
them) or, for ``EDM``, an EDM ensemble trained by :class:`~edm_lightning.models.EnsembleModule` on the share with the
attacker's pool as its OOD set, behind a keyed router with a random key. From their answers it learns

* a meta-classifier (paper Sec. IV-B): the answers on a fixed probe set of ``P`` pool images -> which defense
  (or ``none``). The authors' meta-classifier is one binary classifier per defense on learned query inputs (MNTD's
  query tuning); here the probes are pool images the attacker can buy, and one classifier names every defense: a
  set network over the probe rows (each row with the undefended shadows' mean answer on that probe, then mean and
  spread over the rows), so that a handful of shadows trains it (random halves of the rows augment each shadow);
* a restorer per defense (paper Sec. IV-C, Eq. 3): an MLP mapping a defended answer row to the undefended one,
  trained with the L1 loss on (defended, undefended) shadow answer pairs over pool and share images. For a
  post-processor the pair is one model's answer with and without it; for ``EDM`` the undefended answer is the
  undefended shadow trained on the same share (an EDM ensemble has no undefended self), so its restorer learns a
  noisier map and its restoration error is not comparable with the post-processors'.

The kit depends on the task, the pool and these settings, never on the victim: it is cached and reused by every
victim, budget and re-run. Detection accuracy and restoration error are measured on held-out shadows.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from filelock import FileLock
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from edm_lightning.attacks.purchase import load_record
from edm_lightning.data.images import BatchTensorDataset, batch_loader
from edm_lightning.defense import Victim
from edm_lightning.defense.postprocessors import POSTPROCESSORS, Postprocessor, PostprocessorConfig, resolve_postprocessor
from edm_lightning.errors import ConfigError
from edm_lightning.files import digest, save_atomic
from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule, OptimConfig
from edm_lightning.routing import FixedRouter, KeyedHashRouter
from edm_lightning.seeding import seeded

__all__ = ["EDM", "NONE", "CandidateDefense", "MetaClassifier", "Restorer", "ShadowKit", "ShadowSettings",
           "detection_accuracy", "parse_defenses", "restoration_error", "train_meta_classifier", "train_restorer"]

#: The label of an undefended model.
NONE = "none"
#: The candidate that stands for an EDM ensemble (a shadow ensemble trained by EnsembleModule).
EDM = "EDM"
#: Post-processor arguments the kit supplies per shadow (a shadow misinformation net, a fresh proxy and its seed):
#: the defender's own are unknown to the attacker.
SUPPLIED = ("misinformation_model", "proxy", "seed")
#: Smallest probability the log features see.
EPS = 1e-6
KIT_VERSION = 1


@dataclass(frozen=True)
class CandidateDefense:
    """One defense the kit trains shadows of: ``EDM`` or a post-processor class with its settings.

    Args:
        name: its label in detection figures (``EDM``, ``Rounding(decimals=1)``).
        postprocessor: the post-processor class (``None`` for EDM).
        init_args: its settings (the kit adds :data:`SUPPLIED` ones, ``num_classes`` and ``input_shape``).
    """

    name: str
    postprocessor: type[Postprocessor] | None = None
    init_args: dict[str, Any] = field(default_factory=dict)

    def build(self, num_classes: int, input_shape: tuple[int, ...], supplied: Mapping[str, Any]) -> Postprocessor:
        """The post-processor for one shadow, with the kit's ``supplied`` arguments where the class takes them."""
        parameters = inspect.signature(self.postprocessor).parameters
        args = dict(self.init_args)
        for key, value in {"num_classes": num_classes, "input_shape": tuple(input_shape), **supplied}.items():
            if key in parameters:
                args[key] = value
        return self.postprocessor(**args)


def parse_defenses(entries: Sequence[str | Mapping[str, Any]]) -> list[CandidateDefense]:
    """The candidate defenses a config names: ``EDM``, a post-processor's name (its default settings) or
    ``{class_path: <post-processor>, init_args: {...}}`` as victims' ``postprocessors`` write them.

    Returns:
        The candidates, in order.

    Raises:
        ConfigError: an empty list, an unknown name or class, settings the class refuses, an argument the kit supplies
            itself (``misinformation_model``, ``proxy``, ``seed``), or the same candidate twice; the message lists the
            allowed values.
    """
    allowed = f"{EDM}, a post-processor ({', '.join(POSTPROCESSORS)}) or {{class_path, init_args}} of one"
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence) or not entries:
        raise ConfigError(f"defenses must be a non-empty list of candidate defenses, each {allowed}; got {entries!r}")
    candidates = []
    for position, entry in enumerate(entries):
        if entry == EDM:
            candidates.append(CandidateDefense(EDM))
            continue
        if isinstance(entry, str):
            if entry not in POSTPROCESSORS:
                raise ConfigError(f"defenses[{position}]: unknown candidate defense {entry!r}: expected {allowed}")
            entry = {"class_path": entry}
        cls, init_args = resolve_postprocessor(dict(entry) if isinstance(entry, Mapping) else entry, position)
        given = sorted(set(init_args) & set(SUPPLIED))
        if given:
            raise ConfigError(f"defenses[{position}] ({cls.__name__}): {given} are the defender's own and unknown to the "
                              "attacker: the shadow kit supplies its own per shadow; leave them out")
        placeholders = {key: "shadow" for key in SUPPLIED
                        if key in inspect.signature(cls).parameters and key != "seed"}
        PostprocessorConfig.parse({"class_path": cls.__name__ if cls.__name__ in POSTPROCESSORS else entry["class_path"],
                                   "init_args": {**init_args, **placeholders}}, position)  # types and names
        settings = ", ".join(f"{key}={value!r}" for key, value in sorted(init_args.items()))
        candidates.append(CandidateDefense(f"{cls.__name__}({settings})" if settings else cls.__name__, cls, init_args))
    names = [candidate.name for candidate in candidates]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"defenses: {twice} listed twice; list each candidate once")
    return candidates


def _row_features(answers: Tensor, reference: Tensor) -> Tensor:
    """Per answer row ``(..., K)``: the row, the reference row, both sorted-row views and their agreement."""
    ordered = answers.sort(dim=-1, descending=True).values
    logs = ordered.clamp_min(EPS).log() / -math.log(EPS) + 1  # in [0, 1]: 0 for p <= EPS
    l1 = (answers - reference).abs().sum(dim=-1, keepdim=True)
    agree = (answers.argmax(dim=-1) == reference.argmax(dim=-1)).unsqueeze(-1).to(answers.dtype)
    return torch.cat([answers, reference, ordered, logs, l1, agree], dim=-1)


class MetaClassifier(nn.Module):
    """Which defense answered: a set network over the answer rows of one model on the ``P`` probes.

    Each row (with the reference row: the undefended shadows' mean answer on the same probe) is embedded by an MLP;
    the mean and spread of the embeddings over the rows go to a linear-ReLU head over the labels.

    Args:
        num_classes: K, the answer length.
        labels: how many defenses (``none`` included) it tells apart.
        hidden: embedding width.
    """

    def __init__(self, num_classes: int, labels: int, hidden: int = 64):
        super().__init__()
        self.rows = nn.Sequential(nn.Linear(4 * num_classes + 2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, labels))

    def forward(self, answers: Tensor, reference: Tensor) -> Tensor:
        """Logits ``(B, labels)`` for the answers ``(B, P, K)`` of B models on the probes, ``reference`` ``(P, K)``."""
        h = self.rows(_row_features(answers, reference.expand_as(answers)))
        return self.head(torch.cat([h.mean(dim=1), h.std(dim=1, unbiased=False)], dim=-1))


def train_meta_classifier(answers: Mapping[str, Tensor], reference: Tensor, steps: int = 600, subset: float = 0.5,
                          lr: float = 1e-3, seed: int = 0) -> MetaClassifier:
    """Train a :class:`MetaClassifier` on shadow answers: ``answers[label]`` ``(S, P, K)``, S shadows per label.

    Each step sees every shadow through the same random ``subset`` of the probe rows (a set network takes any number),
    so a few shadows give many training sets.

    Returns:
        The trained classifier (eval mode); its output ``i`` is ``list(answers)[i]``.
    """
    labels = list(answers)
    x = torch.stack([answers[label].float() for label in labels])  # (C, S, P, K)
    classes, shadows, probes, k = x.shape
    x, target = x.flatten(0, 1), torch.arange(classes).repeat_interleave(shadows)
    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = MetaClassifier(k, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rows = max(1, int(probes * subset))
    for _ in range(steps):
        chosen = torch.randperm(probes, generator=generator)[:rows]
        loss = F.cross_entropy(model(x[:, chosen], reference[chosen].float()), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def detection_accuracy(model: MetaClassifier, answers: Mapping[str, Tensor], reference: Tensor) -> dict[str, float]:
    """Per label, the share of models (``answers[label]`` ``(S, P, K)``, in the training order of labels) the
    meta-classifier names correctly from all ``P`` probes.

    Returns:
        ``{label: accuracy in [0, 1]}``.
    """
    labels = list(answers)
    return {label: float((model(answers[label].float(), reference.float()).argmax(dim=-1) == i).float().mean())
            for i, label in enumerate(labels)}


class Restorer(nn.Module):
    """D-DAE's restorer: a defended answer row ``(N, K)`` -> the undefended one, a probability row.

    An MLP (LeakyReLU, as the authors') on the row and its log, standardised first (a perturbation such as Reverse
    Sigmoid squeezes every answer into a narrow band), adds a correction to the row's log-probabilities, then softmax.

    Args:
        num_classes: K.
        hidden: width of the first layer (the second is half of it).
    """

    def __init__(self, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(2 * num_classes, affine=False), nn.Linear(2 * num_classes, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, hidden // 2), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden // 2, num_classes))

    def forward(self, answers: Tensor) -> Tensor:
        """Restored probability rows ``(N, K)`` for defended rows ``answers`` ``(N, K)``."""
        logs = answers.clamp_min(EPS).log()
        return (logs + self.net(torch.cat([answers, logs / -math.log(EPS)], dim=-1))).softmax(dim=-1)


def train_restorer(defended: Tensor, clean: Tensor, steps: int = 1500, batch_size: int = 256, lr: float = 3e-3,
                   seed: int = 0) -> Restorer:
    """Fit a :class:`Restorer` to (defended, undefended) answer pairs ``(N, K)`` with D-DAE's L1 loss (paper Eq. 3:
    ``sum_k |R(y~)_k - y_k|``, batch mean), ``steps`` Adam steps on random batches.

    Returns:
        The trained restorer (eval mode).
    """
    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = Restorer(defended.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    defended, clean = defended.float(), clean.float()
    for _ in range(steps):
        index = torch.randint(0, len(defended), (min(batch_size, len(defended)),), generator=generator)
        loss = (model(defended[index]) - clean[index]).abs().sum(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def restoration_error(model: Restorer | None, defended: Tensor, clean: Tensor) -> dict[str, float]:
    """Mean L1 distance per row to the undefended answers ``clean`` ``(N, K)``: of the restored answers and of the
    defended ones left as they are.

    Returns:
        ``{"restored": ..., "left": ...}`` (0 to 2).
    """
    restored = model(defended.float()) if model is not None else defended.float()
    return {"restored": float((restored - clean).abs().sum(dim=-1).mean()),
            "left": float((defended.float() - clean).abs().sum(dim=-1).mean())}


@dataclass(frozen=True)
class ShadowSettings:
    """What a shadow kit is made of (its cache key).

    Args:
        dataset, surrogate: the victim's task and the attacker's pool.
        share: fraction of the task's training split the attacker holds, in (0, 1].
        seed: the attacker's seed (the share, the probes, every shadow).
        shadows: shadow models per label; ``held_out`` of them measure the kit, the rest train it.
        arch: the shadows' architecture (the clone's).
        defenses: the candidate defenses.
        probes: P, pool images the meta-classifier reads the answers on.
        pool_images: further pool images (the EDM shadows' OOD set, and with the share the restorers' inputs).
        epochs: training epochs of each shadow (classifier, EDM ensemble, misinformation net).
        edm_members: members of a shadow EDM ensemble.
        batch_size: shadow training batch size.
        kit_steps: Adam steps of the meta-classifier and of each restorer.
    """

    dataset: str
    surrogate: str
    share: float
    seed: int
    shadows: int
    held_out: int
    arch: str
    defenses: tuple[CandidateDefense, ...]
    probes: int
    pool_images: int
    epochs: int
    edm_members: int
    batch_size: int
    kit_steps: int = 1500

    def key(self) -> str:
        """A digest of every setting (the kit's file name)."""
        defenses = [[d.name, d.postprocessor.__module__ + "." + d.postprocessor.__qualname__ if d.postprocessor else None]
                    for d in self.defenses]
        plain = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "defenses"}
        return digest({"version": KIT_VERSION, **plain, "defenses": defenses}, length=16)

    @property
    def labels(self) -> list[str]:
        """``none`` and every candidate's name: the meta-classifier's outputs."""
        return [NONE, *(d.name for d in self.defenses)]


class ShadowKit:
    """A trained kit: the probe positions, the meta-classifier and its reference rows, a restorer per defense, and the
    figures measured on held-out shadows.

    Args:
        settings: what it was trained with.
        probe_indices: positions of the P probes in the pool ``(P,)``.
        reference: the undefended training shadows' mean answer per probe ``(P, K)``.
        meta: the meta-classifier.
        restorers: a restorer per defense name.
        figures: ``detection_accuracy`` and ``restoration_error`` per defense, ``held_out`` shadows.
    """

    def __init__(self, settings: ShadowSettings, probe_indices: Tensor, reference: Tensor, meta: MetaClassifier,
                 restorers: dict[str, Restorer], figures: dict[str, Any]):
        self.settings, self.probe_indices, self.reference = settings, probe_indices, reference
        self.meta, self.restorers, self.figures = meta, restorers, figures

    @torch.no_grad()
    def detect(self, answers: Tensor) -> tuple[str, dict[str, float]]:
        """The defense behind the answers ``(P, K)`` to the probes, and the meta-classifier's probability of each.

        Returns:
            ``(label, {label: probability})``.
        """
        probs = self.meta(answers.float().unsqueeze(0), self.reference.float()).softmax(dim=-1)[0]
        labels = self.settings.labels
        return labels[int(probs.argmax())], {label: round(float(p), 4) for label, p in zip(labels, probs)}

    @torch.no_grad()
    def restore(self, label: str, answers: Tensor, batch_size: int = 8192) -> Tensor:
        """Answers ``(N, K)`` restored with ``label``'s restorer (``none``: as they are), in their dtype."""
        if label == NONE:
            return answers
        restorer = self.restorers[label]
        return torch.cat([restorer(part.float()).to(answers.dtype) for part in answers.split(batch_size)]) \
            if len(answers) else answers

    def save(self, path: Path) -> None:
        """Write the kit (tensors, state dicts and plain figures only) atomically."""
        save_atomic({"version": KIT_VERSION, "labels": self.settings.labels, "probe_indices": self.probe_indices,
                     "reference": self.reference, "meta": self.meta.state_dict(),
                     "restorers": {name: r.state_dict() for name, r in self.restorers.items()},
                     "figures": self.figures}, path)

    @classmethod
    def load(cls, path: Path, settings: ShadowSettings, num_classes: int, pool_size: int) -> ShadowKit:
        """Read a kit :meth:`save` wrote for ``settings`` and a pool of ``pool_size`` images, without running any code
        from the file.

        Returns:
            The kit.

        Raises:
            ConfigError: the file is not such a kit (unreadable, other labels, other probe images, weights of another
                shape); the message names it.
        """
        keys = ("version", "labels", "probe_indices", "reference", "meta", "restorers", "figures")
        retrain = "delete it and the kit is trained again (nothing is bought for it)"
        try:
            blob = load_record(path, "D-DAE shadow kit", keys)
        except ConfigError as err:
            raise ConfigError(str(err).split(";")[0] + f"; {retrain}") from None
        problem, kit = _read_kit(blob, settings, num_classes, pool_size)
        if kit is None:
            raise ConfigError(f"{str(path)!r} is not a D-DAE shadow kit for these settings ({problem}); {retrain}")
        return kit


def _read_kit(blob: dict, settings: ShadowSettings, num_classes: int, pool_size: int) -> tuple[str, ShadowKit | None]:
    """The kit ``blob`` holds, or what is wrong with it (``(problem, None)``)."""
    if blob["version"] != KIT_VERSION or list(blob["labels"]) != settings.labels:
        return f"it tells apart {blob['labels']!r}, not {settings.labels!r}", None
    probes, reference = blob["probe_indices"], blob["reference"]
    if not isinstance(probes, Tensor) or not isinstance(reference, Tensor) or tuple(probes.shape) != (settings.probes,) \
            or tuple(reference.shape) != (settings.probes, num_classes):
        return f"probes and reference of other shapes than ({settings.probes},) and ({settings.probes}, {num_classes})", None
    if not torch.equal(probes.long(), pool_draw(settings, pool_size)[0]):
        return "its probes are not this seed's probe images of this pool", None
    try:
        meta = MetaClassifier(num_classes, len(settings.labels))
        meta.load_state_dict(blob["meta"])
        restorers = {}
        for name in settings.labels[1:]:
            restorers[name] = Restorer(num_classes)
            restorers[name].load_state_dict(blob["restorers"][name])
        figures = dict(blob["figures"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        return str(err), None
    return "", ShadowKit(settings, probes.long(), reference, meta.eval(), {k: r.eval() for k, r in restorers.items()},
                         figures)


def shadow_kit(path: Path, settings: ShadowSettings, spec: Any, share: Callable[[], tuple[Tensor, Tensor]],
               pool: Tensor, device: torch.device | str = "cpu") -> ShadowKit:
    """The kit ``settings`` describe: read from ``path``, or trained (one process at a time) and saved there.

    Args:
        path: the kit's file.
        settings: its settings.
        spec: the task (``input_shape``, ``num_classes``, ``mean``, ``std``).
        share: gives the attacker's share of the training split, images in [0, 1] ``(n, C, H, W)`` and labels ``(n,)``
            (called only when the kit is trained, not when it is read).
        pool: the attacker's pool, images in [0, 1] ``(N, C, H, W)``; ``probe_indices`` and the other pool images are
            drawn from it with the seed.
        device: where the shadows train (``cpu``, or the attack's own device, e.g. ``cuda:1``).

    Returns:
        The kit.
    """
    with FileLock(path.with_name(path.name + ".lock")):
        if path.is_file():
            return ShadowKit.load(path, settings, spec.num_classes, len(pool))
        kit = train_shadow_kit(settings, spec, share(), pool, device)
        kit.save(path)
        return kit


def pool_draw(settings: ShadowSettings, pool_size: int) -> tuple[Tensor, Tensor]:
    """The probes' positions in the pool ``(P,)`` and the other pool images' ``(M,)``, disjoint, drawn with the seed
    (the probes depend on the seed and ``P`` only, so every kit setting reads the same bought probes).

    Returns:
        ``(probe positions, other positions)``.
    """
    order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(settings.seed * 7919 + 17))
    return order[: settings.probes], order[settings.probes: settings.probes + settings.pool_images]


def train_shadow_kit(settings: ShadowSettings, spec: Any, share: tuple[Tensor, Tensor], pool: Tensor,
                     device: torch.device | str = "cpu") -> ShadowKit:
    """Train the shadows, the meta-classifier and the restorers (see the module docstring); the global random state is
    left as it was.

    Returns:
        The kit, with ``detection_accuracy`` and ``restoration_error`` per defense on the held-out shadows.
    """
    probe_at, other_at = pool_draw(settings, len(pool))
    probes, inputs = pool[probe_at], torch.cat([pool[other_at], share[0]])
    labels = settings.labels
    probe_answers: dict[str, list[Tensor]] = {label: [] for label in labels}
    input_answers: dict[str, list[Tensor]] = {label: [] for label in labels}
    shape, k = tuple(spec.input_shape), spec.num_classes
    for i in range(settings.shadows):
        seed = settings.seed * 1000 + i
        net = _fit_classifier(ClassifierModule, settings, spec, share, seed, device)
        undefended = Victim([net], FixedRouter(1), shape, k).eval()
        misinformation = None
        for label in labels:
            if label == NONE:
                victim = undefended
            elif label == EDM:
                victim = _edm_shadow(settings, spec, share, pool[other_at], seed, device)
            else:
                defense = next(d for d in settings.defenses if d.name == label)
                if "misinformation_model" in inspect.signature(defense.postprocessor).parameters and misinformation is None:
                    misinformation = _fit_classifier(MisinformationModule, settings, spec, share, seed, device)
                post = defense.build(k, shape, {"misinformation_model": misinformation, "proxy": None, "seed": seed})
                victim = Victim([net], FixedRouter(1), shape, k, postprocessors=[post]).eval()
            with seeded(seed):
                probe_answers[label].append(victim(probes))
                input_answers[label].append(victim(inputs))
    train = slice(0, settings.shadows - settings.held_out)
    held = slice(settings.shadows - settings.held_out, settings.shadows)
    stacked = {label: torch.stack(rows).float() for label, rows in probe_answers.items()}  # (S, P, K)
    reference = stacked[NONE][train].mean(dim=0)
    meta = train_meta_classifier({label: a[train] for label, a in stacked.items()}, reference, steps=settings.kit_steps,
                                 seed=settings.seed)
    figures: dict[str, Any] = {
        "held_out": settings.held_out,
        "detection_accuracy": detection_accuracy(meta, {label: a[held] for label, a in stacked.items()}, reference)}
    clean = torch.stack(input_answers[NONE]).float()
    restorers, errors = {}, {}
    for label in labels[1:]:
        defended = torch.stack(input_answers[label]).float()
        restorers[label] = train_restorer(defended[train].flatten(0, 1), clean[train].flatten(0, 1), steps=settings.kit_steps,
                                          seed=settings.seed)
        errors[label] = {key: round(value, 4) for key, value in
                         restoration_error(restorers[label], defended[held].flatten(0, 1), clean[held].flatten(0, 1)).items()}
    figures["restoration_error"] = errors
    figures["detection_accuracy"] = {k: round(v, 4) for k, v in figures["detection_accuracy"].items()}
    return ShadowKit(settings, probe_at, reference, meta, restorers, figures)


def _fit_classifier(module_class: type[ClassifierModule], settings: ShadowSettings, spec: Any,
                    share: tuple[Tensor, Tensor], seed: int, device: torch.device | str) -> nn.Module:
    """A shadow classifier (or misinformation net) trained on the share.

    Returns:
        Its net, on the CPU, in eval mode.
    """
    with seeded(seed):
        module = module_class(settings.arch, spec.num_classes, tuple(spec.input_shape), spec.mean, spec.std,
                              OptimConfig(name="adam", lr=1e-3, schedule="constant"))
        loader = batch_loader(BatchTensorDataset(*share), settings.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
        _fit(module, loader, settings.epochs, device)
    return module.net.cpu().eval()


def _edm_shadow(settings: ShadowSettings, spec: Any, share: tuple[Tensor, Tensor], ood: Tensor, seed: int,
                device: torch.device | str) -> Victim:
    """A shadow EDM ensemble trained by EnsembleModule's own objective (the share in distribution, ``ood`` out of it),
    served behind a keyed router with a random key.

    Returns:
        The shadow EDM as a victim serves it.
    """
    with seeded(seed):
        module = EnsembleModule(settings.arch, settings.edm_members, spec.num_classes, tuple(spec.input_shape), spec.mean,
                                spec.std, OptimConfig(name="adam", lr=1e-3, schedule="constant"), router="fixed")
        generator = torch.Generator().manual_seed(seed)
        loaders = {"id": batch_loader(BatchTensorDataset(*share), settings.batch_size, shuffle=True, generator=generator),
                   "ood": batch_loader(_Images(ood), settings.batch_size, shuffle=True, generator=generator)}
        _fit(module, CombinedLoader(loaders, mode="max_size_cycle"), settings.epochs, device)
        key = bytes(torch.randint(0, 256, (16,), generator=generator).tolist())
    router = KeyedHashRouter(settings.edm_members, key=key)
    return Victim([m.cpu().eval() for m in module.members], router, tuple(spec.input_shape), spec.num_classes).eval()


class _Images(TensorDataset):
    """Images only: batches are the image tensor itself (an EDM OOD batch)."""

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.tensors[0][torch.as_tensor(indices, dtype=torch.long)]


def _fit(module: L.LightningModule, loader: Any, epochs: int, device: torch.device | str) -> None:
    """A quiet nested fit on in-memory data: no logger, checkpoint, progress bar or validation, on ``device`` alone."""
    device = torch.device(device)
    accelerator = {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
    devices = [device.index] if device.type == "cuda" and device.index is not None else 1
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator=accelerator, devices=devices, num_sanity_val_steps=0,
                        limit_val_batches=0)
    with _quiet():
        trainer.fit(module, train_dataloaders=loader)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence a nested Trainer's start-up lines and its few-workers warning (one set per shadow)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


