"""Shared fixtures: tiny synthetic datasets in torchvision's on-disk layout, and the real-data root.

Synthetic data lives only here (and in ``tests/synthetic_victims.py``), for unit tests; integration tests use real datasets fetched by the
project's own fetch command (offline sources where there is no internet).
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests never talk to a W&B server; the W&B tests opt into offline mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning
import numpy as np
import pytest
import torch

from edm_lightning.data.fetch import _write_idx, fetch

REPO_ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.synthetic_victims"]  # tiny victims and datasets for the attack tests


def write_fake_mnist_like(root: Path, folder: str, n_train: int = 240, n_test: int = 60, classes: int = 10, seed: int = 0) -> Path:
    """An MNIST-layout dataset whose class is a bright bar at a class-dependent row: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, classes, size=n)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            row = 2 + int(label) * 24 // classes
            images[i, row : row + 2, 4:24] = 255
        _write_idx(raw, prefix, images, labels)
    return root


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A data root holding synthetic FashionMNIST- and Animal-MNIST-layout datasets."""
    write_fake_mnist_like(tmp_path, "FashionMNIST", seed=0)
    write_fake_mnist_like(tmp_path, "AnimalMNIST", n_train=120, n_test=40, seed=1)
    write_fake_mnist_like(tmp_path, "MNIST", n_train=200, n_test=50, seed=2)
    return tmp_path


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real datasets the integration tests need, fetched once (offline sources when offline).

    ``EDM_TEST_DATA_ROOT`` points the tests at an existing data root; by default the repository's
    own ``data/`` (git-ignored) is used so repeated runs fetch nothing.
    """
    root = Path(os.environ.get("EDM_TEST_DATA_ROOT", REPO_ROOT / "data"))
    for name in ("fashionmnist", "mnist", "animal-mnist"):
        fetch(name, root)
    return root


def localise_config(config: str | Path, tmp_path: Path, data_root: Path) -> Path:
    """A copy of a committed config whose outputs go under ``tmp_path`` and data comes from ``data_root``.

    Every string value starting with ``runs/`` is moved under ``tmp_path``; every ``root: data`` points
    at ``data_root``. Tests run the real configs, only writing where pytest cleans up.
    """
    import yaml

    def rewrite(node):
        if isinstance(node, dict):
            return {k: (str(data_root) if k == "root" and v == "data" else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if isinstance(node, str) and node.startswith("runs/"):
            return str(tmp_path / node)
        return node

    with open(REPO_ROOT / config) as f:
        data = rewrite(yaml.safe_load(f))
    out = tmp_path / Path(config).name
    with open(out, "w") as f:
        yaml.safe_dump(data, f)
    return out

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
