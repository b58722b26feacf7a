"""Seeding a training job so that its random draws follow the seed alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from typing_extensions import override

__all__ = ["ReseedOnFit", "seeded"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's generators seeded with ``seed`` inside, and leave every generator (the CPU's and each CUDA
    device's) as it was outside: what is built inside depends on ``seed`` alone, and the caller's own draws do not
    move (so whether a cached part was built in this process or read back changes nothing downstream).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ReseedOnFit(L.Callback):
    """Re-seed every generator with the job's ``seed_everything`` when fitting starts.

    LightningCLI seeds once, before it builds the DataModule and the model, and the model's initial weights
    draw from that stream; without this callback the order of the training batches would then depend on how
    many numbers the model took (its architecture, its N members). Re-seeding once the model exists gives
    every job of one seed the same batches, and keeps the experiment runner's stages equal to the figures it
    measured before its stages were LightningCLI jobs (it seeded before building the model and again before
    the Trainer). It uses the seed of the process's last ``seed_everything`` (LightningCLI's, in a CLI job);
    in a process that never seeded, it does nothing.
    """

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            reset_seed()
