"""Router balance and stability on real data: which member serves each of 10k test images, per router.

    python benchmarks/routing.py --hash_checkpoint runs/hashnet/checkpoints/best.ckpt

For each dataset (the defender's in-distribution test set, the attacker's surrogate set, the OOD set)
prints each member's share over its fair share 1/N (target: none above 1.5x on benign inputs), the
share of inputs that keep their member when re-sent with faint Gaussian noise (std 0.01 and 0.02, about
2.5 and 5 grey levels) or shifted by 1 and 2 pixels: what an attacker averaging re-queries would exploit;
and the router's cost as images/s on batches of 256.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from edm_lightning.data import load_images  # noqa: E402
from edm_lightning.routing import ROUTERS, build_router, router_label  # noqa: E402


def main(
    hash_checkpoint: str = "runs/hashnet/checkpoints/best.ckpt",
    datasets: tuple[str, ...] = ("fashionmnist", "mnist", "animal-mnist"),
    root: str = "data",
    num_members: int = 5,
    noise: tuple[float, ...] = (0.01, 0.02),
    shifts: tuple[int, ...] = (1, 2),
    size: int = 10000,
    routers: tuple[str | dict[str, Any], ...] | None = None,
) -> None:
    """Print member shares, stability under noise and shifts, and cost of every registered router (fixed aside).

    Args:
        hash_checkpoint: the neural router's hash network (configs/hashnet.yaml).
        datasets: registry names whose test split is routed.
        root: data root.
        num_members: N.
        noise: stds of the re-query noise, in [0, 1] pixel units.
        shifts: pixel shifts (right and down) of the re-queries.
        size: first this-many test images of each dataset.
        routers: the routers to measure, by name or as ``{class_path, init_args}`` (``None``: every registered
            router but ``fixed``, which sends everything to one member).
    """
    names = routers or [name for name in ROUTERS.names() if name != "fixed"]
    routers = {router_label(spec): build_router(spec, num_members, hash_checkpoint=hash_checkpoint, input_shape=(1, 28, 28))
               for spec in names}
    generator = torch.Generator().manual_seed(0)
    for name in datasets:
        images, _ = load_images(name, root, train=False, input_shape=(1, 28, 28))
        x = images[:size].float() / 255
        variants = {f"noise {std}": (x + std * torch.randn(x.shape, generator=generator)).clamp(0, 1) for std in noise}
        variants |= {f"shift {k}": torch.nn.functional.pad(x, (k, 0, k, 0))[..., :28, :28] for k in shifts}
        for kind, router in routers.items():
            with torch.no_grad():
                route = router(x)
                kept = {label: (router(v) == route).float().mean().item() for label, v in variants.items()}
            shares = route.bincount(minlength=num_members).float() / len(route) * num_members
            print(f"{name:13s} n={len(x):5d} {kind:6s} shares/fair {' '.join(f'{s:.2f}' for s in shares.tolist())}"
                  f"  max {shares.max():.2f}x  kept: " + ", ".join(f"{label} {v:.3f}" for label, v in kept.items()))
    batch = torch.rand(256, 1, 28, 28)
    for kind, router in routers.items():
        with torch.no_grad():
            router(batch)
            start = time.perf_counter()
            for _ in range(20):
                router(batch)
        print(f"cost {kind:6s}: {20 * 256 / (time.perf_counter() - start):9.0f} images/s routed (batches of 256)")

if __name__ == "__main__":
    CLI(main)
