"""One optimiser description shared by every trainable module, so configs and sweeps look alike.

It sits below everything that reads checkpoints: the modules' hyper-parameters hold an :class:`OptimConfig`,
and :func:`~edm_lightning.checkpoints.read_checkpoint` must accept it without the training code imported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from edm_lightning.errors import ConfigError

__all__ = ["OptimConfig", "build_optimizer"]


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Args:
        name: ``adam`` or ``sgd`` (with Nesterov momentum).
        lr: initial learning rate.
        weight_decay: L2 penalty.
        momentum: SGD momentum (ignored by Adam).
        schedule: ``cosine`` (anneal to 0 over the run's epochs), ``step`` (x0.1 every ``step_size`` epochs)
            or ``constant``.
        step_size: epochs between decays of the ``step`` schedule.
    """

    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_size: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:  # written so that NaN fails too
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < math.inf:
            raise ConfigError(f"optim.momentum must be a finite number >= 0, got {self.momentum}")
        if not self.step_size > 0:
            raise ConfigError(f"optim.step_size must be > 0, got {self.step_size}")


def build_optimizer(params: Iterable[nn.Parameter], config: OptimConfig, max_epochs: int | None):
    """Lightning's ``configure_optimizers`` return value for ``config``; the schedule steps once an epoch."""
    if config.name == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.momentum > 0
        )
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    unbounded = max_epochs is None or max_epochs <= 0  # max_epochs=-1: no horizon to anneal over
    if config.schedule == "constant" or (config.schedule == "cosine" and unbounded):
        return optimizer
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=0.1)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
