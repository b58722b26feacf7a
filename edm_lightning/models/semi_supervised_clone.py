"""A clone that also learns from the attacker's unlabelled images: FixMatch (Sohn et al., NeurIPS 2020).

KnockoffNets trains the clone on the images it bought answers for; the rest of the attacker's pool is never
queried and, in plain KnockoffNets, never used. A semi-supervised clone learns from it too, with FixMatch's
consistency loss (paper Eq. 4): for each unlabelled image ``u`` the clone's prediction on a weakly augmented
view, ``q = softmax(clone(weak(u)))``, is turned into a hard pseudo-label ``argmax q`` where the clone is
confident (``max q >= tau``), and the clone is trained to predict that label on a strongly augmented view::

    loss = CE(clone(x), victim's answer)  +  lambda_u * mean_u[ 1(max q >= tau) * CE(clone(strong(u)), argmax q) ]

(Eq. 2 + lambda_u * Eq. 4; the mean runs over all ``mu * B`` unlabelled rows, the masked ones count as zero).
ModelGuard (Tang et al., 2024) calls an attacker that adds such an unlabelled term S4L; their code uses rotation
prediction as the auxiliary task, FixMatch's consistency is the stronger, current choice.

Augmentations are torchvision's ``transforms.v2``, drawn for every image on its own (a v2 transform draws its
random parameters once per call, so one call on a batch would move every image alike). Suited to 28x28 grey
digits by default: no horizontal flip (``shift_flip`` adds it for natural images).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2
from typing_extensions import override

from edm_lightning.errors import ConfigError
from edm_lightning.models.clone import CloneModule, clone_loss
from edm_lightning.models.step_logs import log_training_step
from edm_lightning.optim import OptimConfig

__all__ = ["STRONG_AUGMENTS", "WEAK_AUGMENTS", "SemiSupervisedCloneModule", "augment_each", "build_augment",
           "check_fixmatch_settings", "consistency_loss"]

WeakAugment = Literal["none", "shift", "shift_flip"]
StrongAugment = Literal["randaugment", "affine"]
#: The weak augmentations (labelled images, and the view the pseudo-label is read from).
WEAK_AUGMENTS = ("none", "shift", "shift_flip")
#: The strong augmentations (the view the pseudo-label is taught on).
STRONG_AUGMENTS = ("randaugment", "affine")

#: Largest shift of the weak augmentation, as a share of the image side (FixMatch's 12.5%: 4 of 32 pixels).
SHIFT_SHARE = 0.125


def build_augment(name: str, input_shape: tuple[int, int, int]) -> v2.Transform | None:
    """The augmentation ``name`` for one image ``(C, H, W)`` in [0, 1] of ``input_shape``.

    * ``none``: the image as it is (``None``);
    * ``shift``: a random translation by up to 12.5% of the side in each direction (zero padding, then a random
      crop back to the size: FixMatch's weak augmentation without the flip);
    * ``shift_flip``: a horizontal flip with probability 1/2, then ``shift`` (FixMatch's weak augmentation);
    * ``randaugment``: ``shift``, then two random RandAugment operations (torchvision's magnitude 9 of 31; FixMatch
      draws the magnitude at random), then Cutout (one erased rectangle of 2-25% of the image, set to 0);
    * ``affine``: a random rotation (up to 15 degrees), shift (12.5%), scale (0.85-1.15) and shear (10 degrees), then
      the same Cutout: a strong, purely geometric augmentation.

    Returns:
        The transform, or ``None`` for ``none``.

    Raises:
        ConfigError: an unknown name (the message lists the allowed ones).
    """
    side = min(int(input_shape[-2]), int(input_shape[-1]))
    pad = max(1, round(SHIFT_SHARE * side))
    shift = v2.RandomCrop((int(input_shape[-2]), int(input_shape[-1])), padding=pad, fill=0)
    cutout = v2.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(0.5, 2.0), value=0)
    if name == "none":
        return None
    if name == "shift":
        return shift
    if name == "shift_flip":
        return v2.Compose([v2.RandomHorizontalFlip(), shift])
    if name == "randaugment":
        return v2.Compose([shift, v2.RandAugment(num_ops=2, magnitude=9), cutout])
    if name == "affine":
        return v2.Compose([v2.RandomAffine(degrees=15, translate=(SHIFT_SHARE, SHIFT_SHARE), scale=(0.85, 1.15), shear=10),
                           cutout])
    raise ConfigError(f"unknown augmentation {name!r}: expected one of {', '.join(WEAK_AUGMENTS + STRONG_AUGMENTS)}")


def augment_each(transform: v2.Transform | None, x: Tensor) -> Tensor:
    """``transform`` applied to every image of ``x`` ``(N, C, H, W)`` with its own random draw.

    Returns:
        The augmented images, ``(N, C, H, W)`` (``x`` itself when ``transform`` is ``None`` or ``x`` is empty).
    """
    if transform is None or not len(x):
        return x
    if x.device.type != "cpu":
        return torch.stack([transform(image) for image in x])
    # One intra-op thread on the CPU: a 28x28 image is too small to split, and on a busy CPU the threads' hand-offs
    # took 10-100x the work itself (0.3 ms per strong view with one thread, 10-30 ms with two on a loaded 2-core host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.stack([transform(image) for image in x])
    finally:
        torch.set_num_threads(threads)


def consistency_loss(weak_logits: Tensor, strong_logits: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """FixMatch's unlabelled loss (Sohn et al. 2020, Eq. 4) and the share of rows it keeps.

    ``q = softmax(weak_logits)`` (no gradient flows through it); a row counts where ``max q >= tau``, with the
    cross-entropy of ``strong_logits`` against the hard pseudo-label ``argmax q``; the mean runs over all rows.

    Args:
        weak_logits: the clone's logits on the weak views, ``(N, C)``.
        strong_logits: its logits on the strong views of the same images, ``(N, C)``.
        tau: the confidence threshold, in (0, 1].

    Returns:
        ``(loss, mask share)``: scalars; the loss is 0 when no row reaches ``tau``.

    Example:
        >>> weak = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # confidences 0.98 and 0.5
        >>> consistency_loss(weak, torch.zeros(2, 2), tau=0.95)
        (tensor(0.3466), tensor(0.5000))
    """
    confidence, pseudo_label = weak_logits.detach().float().softmax(dim=-1).max(dim=-1)
    mask = confidence >= tau
    per_row = F.cross_entropy(strong_logits, pseudo_label, reduction="none")
    return (per_row * mask.to(per_row.dtype)).mean(), mask.float().mean()


def check_fixmatch_settings(tau: float, lambda_u: float, labelled_augment: str = "shift", weak_augment: str = "shift",
                            strong_augment: str = "randaugment") -> None:
    """Refuse FixMatch settings that cannot work, before anything is built or bought.

    Raises:
        ConfigError: ``tau`` outside (0, 1], ``lambda_u`` negative or not finite, or an augmentation name outside
            :data:`WEAK_AUGMENTS` (``labelled_augment``, ``weak_augment``) or :data:`STRONG_AUGMENTS`.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:  # NaN fails too
        raise ConfigError(f"tau must be a confidence threshold in (0, 1] (FixMatch: 0.95), got {tau!r}")
    if isinstance(lambda_u, bool) or not isinstance(lambda_u, (int, float)) or not 0 <= lambda_u < math.inf:
        raise ConfigError(f"lambda_u must be a finite weight >= 0 of the unlabelled loss (0: off; FixMatch: 1), "
                          f"got {lambda_u!r}")
    for key, value, allowed in (("labelled_augment", labelled_augment, WEAK_AUGMENTS),
                                ("weak_augment", weak_augment, WEAK_AUGMENTS),
                                ("strong_augment", strong_augment, STRONG_AUGMENTS)):
        if value not in allowed:
            raise ConfigError(f"unknown {key} {value!r}: expected one of {', '.join(allowed)}")


class SemiSupervisedCloneModule(CloneModule):
    """A clone trained on the bought answers and, with FixMatch's consistency loss, on unlabelled images.

    Training batches are ``{"labelled": (x, target), "unlabelled": u}``: ``x`` ``(B, C, H, W)`` with the victim's
    answers ``target`` (probabilities ``(B, K)`` or labels ``(B,)``, as :class:`CloneModule` takes them) and ``u``
    ``(mu * B, C, H, W)`` unlabelled images, all in [0, 1] (what
    :class:`~edm_lightning.attacks.semi_supervised.SemiSupervisedDataModule` serves). A plain ``(x, target)`` batch,
    or ``lambda_u = 0``, trains on the labelled term alone (with ``labelled_augment``). The labelled images, weak
    and strong views go through the clone as one batch, as FixMatch's do (one set of batch-norm statistics).
    Logged: ``train/supervised_loss``, ``train/consistency_loss``, ``train/mask_share`` (the share of a step's
    unlabelled rows whose confidence reaches ``tau``) and ``train/epoch_mask_share`` (the epoch's, all processes').

    Args:
        arch, num_classes, input_shape, mean, std, optim: see :class:`~edm_lightning.models.CloneModule`.
        tau: confidence threshold of a pseudo-label, in (0, 1] (FixMatch's 0.95).
        lambda_u: weight of the unlabelled loss, finite and >= 0 (FixMatch's 1; 0: the labelled term alone).
        labelled_augment: augmentation of the bought images (``none``, ``shift``, ``shift_flip``); their answers
            are kept.
        weak_augment: the view the pseudo-label is read from (``none``, ``shift``, ``shift_flip``).
        strong_augment: the view it is taught on (``randaugment``, ``affine``); see :func:`build_augment`.

    Raises:
        ConfigError: a setting :func:`check_fixmatch_settings` refuses, or what :class:`CloneModule` refuses.
    """

    def __init__(
        self,
        arch: str = "lenet5",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
        tau: float = 0.95,
        lambda_u: float = 1.0,
        labelled_augment: WeakAugment = "shift",
        weak_augment: WeakAugment = "shift",
        strong_augment: StrongAugment = "randaugment",
    ):
        check_fixmatch_settings(tau, lambda_u, labelled_augment, weak_augment, strong_augment)
        super().__init__(arch, num_classes, input_shape, mean, std, optim)
        self.save_hyperparameters()
        # a plain dict: the transforms hold no state to train, save or move between devices
        self._augments = {view: build_augment(name, input_shape) for view, name in
                          (("labelled", labelled_augment), ("weak", weak_augment), ("strong", strong_augment))}
        self._kept = torch.zeros(2)  # this epoch's unlabelled rows above tau, and all its unlabelled rows
        self.mask_share: float | None = None  # the last epoch's share of unlabelled rows above tau

    @override
    def on_train_epoch_start(self) -> None:
        self._kept = torch.zeros(2, device=self.device)

    @override
    def training_step(self, batch: dict[str, Any] | tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        labelled, u = (batch["labelled"], batch.get("unlabelled")) if isinstance(batch, dict) else (batch, None)
        x, target = labelled
        x = augment_each(self._augments["labelled"], x)
        hp = self.hparams
        if u is None or not len(u) or hp.lambda_u == 0:
            loss = clone_loss(self(x), target)
            log_training_step(self, {"train/loss": loss})
            return loss
        weak, strong = augment_each(self._augments["weak"], u), augment_each(self._augments["strong"], u)
        logits = self(torch.cat([x, weak, strong]))
        supervised = clone_loss(logits[: len(x)], target)
        consistency, share = consistency_loss(logits[len(x): len(x) + len(u)], logits[len(x) + len(u):], hp.tau)
        loss = supervised + hp.lambda_u * consistency
        self._kept += torch.stack([share.detach() * len(u), share.new_tensor(float(len(u)))])
        log_training_step(self, {"train/loss": loss, "train/supervised_loss": supervised,
                                 "train/consistency_loss": consistency, "train/mask_share": share})
        return loss

    @override
    def on_train_epoch_end(self) -> None:
        kept = self.trainer.strategy.reduce(self._kept, reduce_op="sum")  # every process's rows
        if float(kept[1]) > 0:
            self.mask_share = float(kept[0] / kept[1])
            self.log("train/epoch_mask_share", self.mask_share, rank_zero_only=True)

    def figures(self) -> dict[str, Any]:
        """The FixMatch settings and ``mask_share``, the last epoch's share of unlabelled rows above ``tau`` (or None)."""
        hp = self.hparams
        return {"tau": hp.tau, "lambda_u": hp.lambda_u, "strong_augment": hp.strong_augment,
                "mask_share": self.mask_share}
