"""Tiny synthetic victims and datasets for the attack tests: seconds on CPU, no files needed.

The ``victim`` and ``fake_data`` fixtures built from them are in ``tests/conftest.py``."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from edm_lightning.defense import Victim
from edm_lightning.models.clone import CloneModule
from edm_lightning.routing import FixedRouter

SHAPE = (1, 28, 28)  # FashionMNIST's shape, so the registry's spec for "fashionmnist" fits the fakes
CLASSES = 10
EVAL_SIZE = 300  # the fake victim test split; its victim labels are computed directly, not as queries


class CountingVictim(nn.Module):
    """A victim that records every row it answers: the ground truth the oracle's count is checked against."""

    def __init__(self, victim: Victim, fail_after_calls: int | None = None):
        super().__init__()
        self.victim = victim
        self.input_shape, self.num_classes = victim.input_shape, victim.num_classes
        self.rows = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def forward(self, x: Tensor) -> Tensor:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.rows += x.shape[0]
        return self.victim(x)


def prototypes(seed: int = 0) -> Tensor:
    """Ten smooth random 28x28 patterns in [0, 1]: the classes of the synthetic task."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(CLASSES, 1, 7, 7, generator=g)
    return nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)


def linear_victim(seed: int = 0) -> Victim:
    """A fixed linear classifier scoring each class by its prototype (a nearest-prototype rule)."""
    protos = prototypes(seed).flatten(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, CLASSES))
    with torch.no_grad():
        centred = protos - protos.mean(dim=0)
        net[1].weight.copy_(centred * 20)
        net[1].bias.zero_()
    return Victim([net], FixedRouter(1), SHAPE, CLASSES).eval()


def synthetic_images(n: int, seed: int, mix: bool = False) -> tuple[Tensor, Tensor]:
    """uint8 images near the prototypes (``mix``: blends of two, like a surrogate of another domain)."""
    g = torch.Generator().manual_seed(seed)
    protos = prototypes(0)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    images = protos[labels]
    if mix:
        other = protos[torch.randint(0, CLASSES, (n,), generator=g)]
        weight = torch.rand(n, 1, 1, 1, generator=g) * 0.5
        images = (1 - weight) * images + weight * other
    images = (images + 0.15 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def untrained_agreement(datamodule, arch: str = "lenet5", seed: int = 0) -> float:
    """Agreement of a clone that never saw an answer: the floor every attack must clear."""
    L.seed_everything(seed, verbose=False)
    module = CloneModule(arch, datamodule.num_classes, datamodule.input_shape, datamodule.mean, datamodule.std)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/agreement"]


class AnsweredThenKilled(CountingVictim):
    """Answers every query (counting it), and dies right after answering its ``killed_in``-th call."""

    def __init__(self, killed_in: int | None = None):
        super().__init__(linear_victim())
        self.killed_in = killed_in

    def forward(self, x: Tensor) -> Tensor:
        answers = super().forward(x)
        if self.calls == self.killed_in:
            raise KeyboardInterrupt("killed after the victim answered")
        return answers
