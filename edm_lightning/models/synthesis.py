"""Where else EDM's members must disagree (what attacks synthesise) and agree (what benign clients send).

EDM's members learn to disagree on one natural OOD set and to agree on clean in-distribution images, so an
attacker who grows its queries from a few real images by small Jacobian steps (JBDA-TR) is answered as
consistently as a benign client. :class:`Synthesis` adds, per training batch, points made from the defender's
own training images the way attacks make theirs, to the batch the diversity term sees; and a mildly corrupted
copy of the batch to the accuracy term, so that the members keep agreeing where a benign client's camera
noise and framing put its queries. Every point is drawn from the training batch with the global generator
(seeded by ``seed_everything``): nothing of the attacker's pool or the defender's test set is ever used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from edm_lightning.data.perturbations import check_corruption, jacobian_augmentation, noisy_copies
from edm_lightning.errors import ConfigError

__all__ = ["SYNTHESES", "Synthesis", "jacobian_points", "mixup_points", "noise_points"]

#: The kinds of synthesised points the diversity term can also see.
SYNTHESES = ("jacobian", "mixup", "noise")


@dataclass
class Synthesis:
    """Points synthesised from each training batch for the diversity term, and a benign copy for the accuracy term.

    Args:
        disagree_on: kinds of points added to the OOD batch, one per training image each: ``jacobian`` (JBDA-TR's
            points: 1 to ``steps`` targeted sign steps of size ``epsilon`` from the image towards a random other
            class, along a random member's gradient; Papernot et al. 2017, Juuti et al. 2019), ``mixup`` (a blend of
            two images of different classes, weights in [0.3, 0.7]; what mixing attacks query), ``noise`` (the image
            plus Gaussian noise of std ``noise_std``).
        epsilon: the Jacobian step (JBDA's lambda), pixel units of images in [0, 1].
        steps: the most Jacobian steps from one training image.
        noise_std: std of the ``noise`` points.
        agree_noise: std of the Gaussian noise of a corrupted copy of each training image that the accuracy term
            also sees (0 with ``agree_shift`` 0: no copy).
        agree_shift: largest shift, in pixels per axis, of that copy.
        weight: the synthesised points' diversity term's weight beside the OOD set's (both times lambda), in
            [0, 100]; ``None`` pools them with the OOD batch in one mean, so that with as many points as OOD images
            each term weighs half (the first synthesis runs). Needs ``disagree_on``.

    Raises:
        ConfigError: an unknown kind, or a setting out of its range.
    """

    disagree_on: list[Literal["jacobian", "mixup", "noise"]] = field(default_factory=list)
    epsilon: float = 0.1
    steps: int = 2
    noise_std: float = 0.3
    agree_noise: float = 0.0
    agree_shift: int = 0
    weight: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.disagree_on) - set(SYNTHESES))
        if unknown or len(set(self.disagree_on)) != len(self.disagree_on):
            raise ConfigError(f"synthesis.disagree_on must name each of {', '.join(SYNTHESES)} at most once, got "
                              f"{list(self.disagree_on)}")
        if self.weight is not None and not self.disagree_on:
            raise ConfigError(f"synthesis.weight={self.weight!r} weighs synthesised points, but disagree_on names none: "
                              "name the kinds of points in disagree_on, or leave weight unset")
        weight = [("weight", self.weight, 100.0)] if self.weight is not None else []
        for name, value, high in [("epsilon", self.epsilon, 1.0), ("noise_std", self.noise_std, 1.0), *weight]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:  # NaN fails
                raise ConfigError(f"synthesis.{name} must be a number in [0, {high:g}], got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 20:
            raise ConfigError(f"synthesis.steps must be an integer in [1, 20], got {self.steps!r}")
        check_corruption(self.agree_noise, self.agree_shift, ("synthesis.agree_noise", "synthesis.agree_shift"))

    @classmethod
    def of(cls, value: Synthesis | dict[str, Any] | None) -> Synthesis | None:
        """``value`` as a ``Synthesis``: a dict is its fields, as a checkpoint's hyper-parameters or an experiment
        config's ``model`` section hold them.

        Returns:
            The synthesis, or ``None`` for ``None``.
        """
        return cls(**value) if isinstance(value, dict) else value

    @property
    def agrees(self) -> bool:
        """Whether the accuracy term also sees a corrupted copy of the batch."""
        return self.agree_noise > 0 or self.agree_shift > 0

    def step_cost(self, members: int) -> float:
        """A training step's work against the paper's EDM step (every member on one in-distribution and one OOD
        batch): each member also runs on the agreement copy and on each kind of synthesised point, and one member
        takes the Jacobian steps (``(steps + 1) / 2`` forward and backward passes on average). What a runner's
        estimate of the ensemble's training time scales by (the headline's settings: 2.2; they took 2.4x the paper's
        ensemble on a 2-core CPU).

        Returns:
            The ratio, >= 1.
        """
        passes = 2 + int(self.agrees) + len(self.disagree_on)
        if "jacobian" in self.disagree_on:
            passes += (self.steps + 1) / 2 / members
        return passes / 2

    def disagreement_points(self, members: nn.ModuleList, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
        """The synthesised points of one training batch ``x`` ``(B, C, H, W)``, labels ``y`` ``(B,)``.

        Returns:
            Up to ``len(disagree_on) * B`` points ``(M, C, H, W)`` in [0, 1], detached.
        """
        points = []
        if "jacobian" in self.disagree_on:
            member = members[int(torch.randint(len(members), ()))]
            points.append(jacobian_points(member, x, y, num_classes, self.epsilon, self.steps))
        if "mixup" in self.disagree_on:
            points.append(mixup_points(x, y))
        if "noise" in self.disagree_on:
            points.append(noise_points(x, self.noise_std))
        return torch.cat(points) if points else x[:0]

    def agreement_copy(self, x: Tensor) -> Tensor:
        """A mildly corrupted copy of ``x`` ``(B, C, H, W)``, as a benign client would send it.

        Returns:
            ``(B, C, H, W)`` in [0, 1].
        """
        seed = int(torch.randint(2**31 - 1, ()))
        return noisy_copies(x, 1, self.agree_noise, seed=seed, shift=self.agree_shift)


def jacobian_points(net: nn.Module, x: Tensor, y: Tensor, num_classes: int, epsilon: float, steps: int) -> Tensor:
    """JBDA-TR's synthetic points grown from ``x``: each image takes 1 to ``steps`` (drawn per image) targeted steps
    ``x <- clip(x + epsilon * sign(grad_x log softmax(net(x))_t), 0, 1)`` towards a random class ``t != y``.

    Juuti et al., PRADA (EuroS&P 2019), T-RND; Papernot et al. 2017, Eq. 4 (Jacobian-based augmentation).
    The parameters of ``net`` get no gradient.

    Returns:
        ``(B, C, H, W)`` in [0, 1], detached, within ``steps * epsilon`` of ``x`` per pixel.
    """
    target = (y + torch.randint(1, num_classes, y.shape, device=y.device)) % num_classes
    taken = torch.randint(1, steps + 1, (len(x),), device=x.device)
    point = x.detach().clone()
    with torch.enable_grad():  # the step is JBDA-TR's own, in eval mode (BatchNorm keeps the training images' statistics)
        for step in range(1, steps + 1):  # only the images drawn for this many steps or more take it
            moving = (taken >= step).nonzero().squeeze(1)
            if len(moving) == 0:
                break
            labels = moving.to(y.device)
            point[moving] = jacobian_augmentation(net, point[moving], y[labels], epsilon, target[labels])
    return point


def mixup_points(x: Tensor, y: Tensor) -> Tensor:
    """Blends ``a * x_i + (1 - a) * x_j`` of each image with another of a different class (``a`` in [0.3, 0.7]).

    Returns:
        ``(M, C, H, W)``, ``M <= B``: the pairs whose classes differ.
    """
    partner = torch.randperm(len(x), device=x.device)
    differ = y != y[partner]
    weight = 0.3 + 0.4 * torch.rand(int(differ.sum()), 1, 1, 1, device=x.device)
    return weight * x[differ] + (1 - weight) * x[partner][differ]


def noise_points(x: Tensor, std: float) -> Tensor:
    """``clamp(x + std * eps, 0, 1)`` with Gaussian ``eps``.

    Returns:
        ``(B, C, H, W)``.
    """
    return (x + std * torch.randn_like(x)).clamp_(0, 1)
