"""Shared test helpers: Lightning checkpoints of tiny modules, written without a training run."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch


def save_checkpoint(module: lightning.LightningModule, path: Path, **hparam_overrides) -> Path:
    """A checkpoint in Lightning's format (what ModelCheckpoint writes minus optimiser state)."""
    hparams = dict(module.hparams)
    hparams.update(hparam_overrides)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": lightning.__version__},
        path,
    )
    return path


@pytest.fixture
def checkpoint_factory(tmp_path):
    def make(module: lightning.LightningModule, name: str = "model.ckpt", **hparam_overrides) -> str:
        return str(save_checkpoint(module, tmp_path / name, **hparam_overrides))

    return make
