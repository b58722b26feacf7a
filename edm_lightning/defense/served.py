"""The defended model as served, as a LightningModule: ``python main.py test`` gives the defender's accuracy."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import SumMetric
from typing_extensions import override

from edm_lightning.defense.loader import VictimConfig
from edm_lightning.errors import ConfigError

__all__ = ["ServedVictimModule"]


class ServedVictimModule(L.LightningModule):
    """The victim as its clients see it (router and post-processors on), for testing only.

    ``python main.py test`` with this model and the victim's own dataset logs ``test/acc``: the defender's
    accuracy as served, the figure every results table pairs with a clone's accuracy. Nothing is trained.

    Args:
        victim: the victim (checkpoint, router, post-processors); its router key comes from ``$EDM_ROUTER_KEY``
            when the config leaves ``key`` out, as configs should.
        num_classes: linked from the DataModule; must be the victim's.
        input_shape: linked from the DataModule; must be the victim's.
        mean: linked from the DataModule; unused (the victim normalises its own inputs).
        std: linked from the DataModule; unused.

    Raises:
        ConfigError: the victim answers another number of classes, or takes another input shape, than the data has.
    """

    def __init__(self, victim: VictimConfig, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.victim = victim.build()
        if self.victim.num_classes != num_classes or tuple(self.victim.input_shape) != tuple(input_shape):
            raise ConfigError(f"the victim {victim.checkpoint!r} answers {self.victim.num_classes} classes for inputs of shape "
                              f"{tuple(self.victim.input_shape)}, but the data has {num_classes} classes of shape "
                              f"{tuple(input_shape)}: test it on the dataset it was trained on")
        self.correct, self.total = SumMetric(), SumMetric()  # summed over processes under DDP
        self.tested_accuracy: float | None = None  # the last test's, exactly (the logged value is a float32)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The victim's answers ``(B, K)`` to images ``(B, C, H, W)`` in [0, 1]."""
        return self.victim(x)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.correct.update((self(x).argmax(-1) == y).sum())
        self.total.update(len(y))

    @override
    def on_test_epoch_end(self) -> None:
        self.tested_accuracy = int(self.correct.compute().item()) / max(int(self.total.compute().item()), 1)
        self.log("test/acc", self.tested_accuracy)
        self.correct.reset()
        self.total.reset()

    @override
    def configure_optimizers(self) -> Any:
        raise ConfigError("ServedVictimModule is only tested (python main.py test --config ...): it has nothing to train")
