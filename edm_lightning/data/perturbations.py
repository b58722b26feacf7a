"""Perturbed images: copies of a query re-sent to reach other members, Jacobian steps, and reshaped surrogate pools.

Query averaging, EDM's adaptive attacker, sends each image as K copies with faint noise or small shifts and
averages the answers; the routing measurements probe a router with the same copies. JBDA grows its queries by
Jacobian-sign steps (:func:`jacobian_augmentation`), and EDM's ``Synthesis`` grows its disagreement points the same way.
KnockoffNets' attacker may reshape its pool before querying (:func:`dilate_affine`), so that natural images of
another task reach more of the victim's classes.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from edm_lightning.errors import ConfigError

__all__ = ["POOL_TRANSFORMS", "check_copies", "check_corruption", "check_pool_transform", "dilate_affine",
           "jacobian_augmentation", "noisy_copies"]

POOL_TRANSFORMS = ("none", "dilate-affine")
"""What an attacker may do to its surrogate pool before querying: nothing, or :func:`dilate_affine`."""


def noisy_copies(x: Tensor, copies: int, noise: float, seed: int = 0, start: int = 0, shift: int = 0) -> Tensor:
    """``copies`` versions of each image in ``x`` ``(N, C, H, W)``, in order ``(N * copies, C, H, W)``.

    Each copy is shifted by a random offset in ``[-shift, shift]`` pixels per axis (zero fill), then
    ``clamp(copy + noise * eps, 0, 1)`` with Gaussian ``eps``. Both are drawn per image from
    ``(seed, start + i)``, so item ``i`` of a transfer set always gets the same copies, however the run
    was split into batches.

    Returns:
        The copies ``(N * copies, C, H, W)`` in [0, 1].
    """
    out = x.repeat_interleave(copies, dim=0)
    if noise == 0 and shift == 0:
        return out
    # CPU generators keep only the low 32 bits of a seed (seed * 2**32 + i would repeat across seeds):
    # items below a million get distinct streams for every seed below 4,294.
    generators = [torch.Generator().manual_seed((seed * 1_000_003 + start + i) % 2**32) for i in range(len(x))]
    eps = torch.cat([torch.randn((copies, *x.shape[1:]), generator=g) for g in generators]).to(x.device)
    if shift > 0:
        offsets = torch.cat([torch.randint(-shift, shift + 1, (copies, 2), generator=g) for g in generators])
        padded = torch.nn.functional.pad(out, (shift, shift, shift, shift))
        height, width = x.shape[-2:]
        out = torch.stack([padded[j, :, shift + dy: shift + dy + height, shift + dx: shift + dx + width]
                           for j, (dy, dx) in enumerate(offsets.tolist())])
    return (out + noise * eps).clamp_(0, 1) if noise > 0 else out


def dilate_affine(images: Tensor, seed: int, chunk: int = 4096) -> Tensor:
    """Each image thickened and moved at random: the pool a KnockoffNets attacker queries instead of its raw images.

    A thin-stroked pool (MNIST digits) reaches few classes of a victim that sees filled shapes (FashionMNIST:
    the undefended LeNet-5 names sandal for more than half of the MNIST digits). Per image, a grey dilation (a max
    filter of size 1, 3 or 5, each with probability 1/3) thickens the strokes, then a random affine moves the result
    (rotation within +-20 degrees, shear within +-10, scale in [0.9, 1.6], translation within 10% of the side;
    bilinear, zero fill; torchvision ``RandomAffine``'s ranges, in the frame's normalised coordinates, batched). The
    answers then spread over more classes and the clone learns more per query (README, "A stronger KnockoffNets").
    All draws come from one generator seeded with ``seed``, so the same pool and seed give the same images in every
    process; images are transformed ``chunk`` at a time, which bounds the memory (each image is transformed on its
    own, so the chunk does not change it: tested).

    Args:
        images: the pool ``(N, C, H, W)`` on the CPU, ``uint8`` or float in [0, 1].
        seed: the attacker's seed.
        chunk: images transformed at once.

    Returns:
        The transformed pool, same shape and dtype.

    Raises:
        ValueError: ``chunk`` is not a whole number >= 1.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a whole number >= 1 (images transformed at once), got {chunk!r}")
    generator = torch.Generator().manual_seed(seed)
    count = len(images)
    size = 1 + 2 * torch.randint(0, 3, (count,), generator=generator)  # 1, 3 or 5
    angle = torch.deg2rad(torch.empty(count).uniform_(-20, 20, generator=generator))
    shear = torch.deg2rad(torch.empty(count).uniform_(-10, 10, generator=generator))
    scale = torch.empty(count).uniform_(0.9, 1.6, generator=generator)
    shift = torch.empty(count, 2).uniform_(-0.2, 0.2, generator=generator)  # 10% of the side, in [-1, 1] units
    # forward map p -> scale * R(angle) @ Shear(shear) @ p + shift; grid_sample needs its inverse, per image
    cos, sin = angle.cos(), angle.sin()
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    skew = torch.eye(2).repeat(count, 1, 1)
    skew[:, 0, 1] = shear.tan()
    inverse = torch.linalg.inv(scale.view(-1, 1, 1) * rotate @ skew)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=-1)
    out = torch.empty_like(images)
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        x = images[part].float() / 255 if images.dtype == torch.uint8 else images[part].float()
        thick = x.clone()
        for k in (3, 5):
            chosen = size[part] == k
            thick[chosen] = nn.functional.max_pool2d(x[chosen], k, stride=1, padding=k // 2)
        grid = nn.functional.affine_grid(theta[part], list(x.shape), align_corners=False)
        moved = nn.functional.grid_sample(thick, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved.clamp_(0, 1)
        out[part] = moved.mul_(255).round_().to(torch.uint8) if images.dtype == torch.uint8 else moved.to(images.dtype)
    return out


def check_pool_transform(pool_transform: str) -> None:
    """Refuse a pool transform that does not exist (before any query is spent).

    Raises:
        ConfigError: ``pool_transform`` not one of :data:`POOL_TRANSFORMS`.
    """
    if pool_transform not in POOL_TRANSFORMS:
        raise ConfigError(f"unknown pool_transform {pool_transform!r}: expected one of {', '.join(map(repr, POOL_TRANSFORMS))}")


def check_copies(query_copies: int, copy_noise: float, copy_shift: int = 0) -> None:
    """Refuse copy settings :func:`noisy_copies` cannot make (before any query is spent); the experiment runner
    calls it before its first stage, the attacks and the routing probes before they query.

    Raises:
        ConfigError: ``query_copies`` not a whole number >= 1, or the corruption out of range (:func:`check_corruption`).
    """
    if isinstance(query_copies, bool) or not isinstance(query_copies, int) or query_copies < 1:
        raise ConfigError(f"query_copies must be an integer >= 1 (copies sent per surrogate image), got {query_copies!r}")
    check_corruption(copy_noise, copy_shift)


def check_corruption(noise: float, shift: int, names: tuple[str, str] = ("copy_noise", "copy_shift")) -> None:
    """Refuse a corruption :func:`noisy_copies` cannot make, naming the settings as the caller's config does.

    Args:
        noise: the Gaussian noise std (images in [0, 1]).
        shift: the largest shift, in pixels per axis.
        names: how the caller's config names ``noise`` and ``shift`` (the error names them so).

    Raises:
        ConfigError: ``noise`` not a number in [0, 1] (NaN and infinity included) or ``shift`` not a whole number
            in 0..8.
    """
    if isinstance(noise, bool) or not isinstance(noise, Real) or not 0 <= noise <= 1:  # NaN fails too
        raise ConfigError(f"{names[0]} must be in [0, 1] (a number: the noise std, images in [0, 1]), got {noise!r}")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= 8:
        raise ConfigError(f"{names[1]} must be an integer in [0, 8] (largest shift, in pixels), got {shift!r}")


def jacobian_augmentation(
    net: nn.Module, x: Tensor, labels: Tensor, epsilon: float, targets: Tensor | None = None, batch_size: int = 512
) -> Tensor:
    """Papernot's ``x + epsilon * sign(J_F[label](x))`` (or, with ``targets``, a step towards each target).

    Untargeted: gradient of the clone's logit for ``labels``. Targeted (JBDA-TR): gradient of the
    clone's log-probability of ``targets``. Results are clipped to the valid image range [0, 1].

    Returns:
        The new points, ``x``'s shape, in [0, 1].
    """
    was_training = net.training
    net.eval()
    out = []
    for part, label, target in zip(x.split(batch_size), labels.split(batch_size),
                                    (targets if targets is not None else labels).split(batch_size)):
        device = next(net.parameters()).device
        part, label, target = part.detach().to(device).requires_grad_(True), label.to(device), target.to(device)
        logits = net(part)
        score = logits.log_softmax(dim=-1).gather(1, target[:, None]) if targets is not None else logits.gather(1, label[:, None])
        (grad,) = torch.autograd.grad(score.sum(), part)
        out.append((part.detach() + epsilon * grad.sign()).clamp_(0, 1).to(x.device))
    net.train(was_training)
    return torch.cat(out) if out else x.clone()
