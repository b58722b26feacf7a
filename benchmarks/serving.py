"""Serving cost of EDM: throughput of the defended model (N = 5, each router) over one undefended member.

Every model answers the same stream of batches of 64 random images (the issue's setting; ``--batch_size 256``
for larger batches) through ``Victim`` (input validation, routing, the members, softmax); the undefended model
is one member behind a fixed router, served by the same code. Figures are printed, never asserted: timings
depend on the machine.

    python benchmarks/serving.py --batches 20 --repeats 3   # LeNet-5 on 1x28x28 and ResNet-18 on 3x32x32
    python benchmarks/serving.py --archs '[lenet5]'         # LeNet-5 only (ResNet-18 takes minutes on a CPU)
    python benchmarks/serving.py --batches 20 --repeats 5 --device cuda

The neural router is timed with each hash network architecture in ``hash_archs`` (``small_cnn``, the
default of ``configs/hashnet.yaml`` and the experiments, and ``lenet5``), with random weights balanced
on the stream (as ``HashBalanceCallback`` does on real data) so that all members are used: its cost,
not its accuracy, is what is measured here.

The defended members answer a batch in groups of about ``batch_size / N`` rows (one group per member, stacked into
one grouped network for small members on the CPU: ``edm_lightning.defense.fused``), and running in groups alone can
be faster than one call on the whole batch. The row ``undefended, in N groups`` measures that part: the undefended
member answering its rows dealt round-robin over N copies of itself (the same answers: every copy is that member).
Its ratio over ``undefended`` is what grouping alone buys; a defended ratio over it is EDM's cost at equal grouping.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from edm_lightning.defense import Victim  # noqa: E402
from edm_lightning.nets import build_net  # noqa: E402
from edm_lightning.routing import (  # noqa: E402
    FixedRouter,
    KeyedHashRouter,
    NeuralHashRouter,
    Router,
    balance_logit_bias,  # noqa: E402
)

SETTINGS = {"lenet5": (1, 28, 28), "resnet18": (3, 32, 32)}


def main(batches: int = 8, batch_size: int = 64, repeats: int = 3, num_members: int = 5, device: str = "cpu",
         hash_archs: tuple[str, ...] = ("small_cnn", "lenet5"),
         archs: tuple[Literal["lenet5", "resnet18"], ...] = ("lenet5", "resnet18")) -> None:
    """Print images/s of each victim and its ratio to the undefended single member.

    Args:
        batches: batches in the stream.
        batch_size: images per batch (the issue's setting: 64).
        repeats: passes over the stream per model, interleaved; the fastest pass counts.
        num_members: N of the defended ensemble.
        device: torch device to serve on.
        hash_archs: hash network architectures to time the neural router with.
        archs: member architectures to time (``lenet5``, ``resnet18``).
    """
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} stream={batches}x{batch_size} N={num_members}")
    for arch in archs:
        shape = SETTINGS[arch]
        stream = [torch.rand(batch_size, *shape, device=device) for _ in range(batches)]
        models = served_models(arch, shape, num_members, stream, device, hash_archs)
        best = {name: float("inf") for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                best[name] = min(best[name], time_stream(model, stream))
        base = best["undefended"]
        for name, seconds in best.items():
            rate = batches * batch_size / seconds
            print(f"{arch:9s} {'x'.join(map(str, shape)):8s} {name:30s} {rate:10.0f} img/s  ratio {base / seconds:.2f}x")


def served_models(arch, shape, num_members, stream, device, hash_archs) -> dict[str, Victim]:
    members = [build_net(arch, shape, 10).to(device).eval() for _ in range(num_members)]
    routers = {
        "undefended": (members[:1], FixedRouter(1)),
        f"undefended, in {num_members} groups": (members[:1] * num_members, DealtRouter(num_members)),
        f"fixed (N={num_members})": (members, FixedRouter(num_members)),
        f"keyed (N={num_members})": (members, KeyedHashRouter(num_members)),
    }
    for hash_arch in hash_archs:
        hash_net = build_net(hash_arch, shape, 10).to(device).eval()
        with torch.no_grad():
            bias = balance_logit_bias(torch.cat([hash_net(x) for x in stream]).cpu()).to(device)
        router = NeuralHashRouter(hash_net, num_members, bias).to(device)
        routers[f"neural, {hash_arch} hash (N={num_members})"] = (members, router)
    return {name: Victim(m, r, shape, 10).eval().stack_members() for name, (m, r) in routers.items()}


class DealtRouter(Router):
    """Rows dealt round-robin over N groups: batch-dependent, so only for N copies of one member (a reference)."""

    def __init__(self, num_members: int):
        super().__init__()
        self.num_members = num_members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(x.shape[0], device=x.device) % self.num_members


def time_stream(model: Victim, stream: list[torch.Tensor]) -> float:
    model(stream[0])  # warm-up (allocator, cuDNN autotuning)
    sync(stream[0].device)
    start = time.perf_counter()
    for x in stream:
        model(x)
    sync(stream[0].device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    CLI(main)
