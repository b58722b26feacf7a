"""Shared fixtures: tiny synthetic datasets and victims, the real-data root, checkpoints.

The helpers behind them live in ``tests/helpers``; test modules import helpers from there, never from here.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests never talk to a W&B server; the W&B tests opt into offline mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
# The synthetic datasets of `fake_root` use the published datasets' layouts; their digests cannot be the published ones.
os.environ.setdefault("EDM_SYNTHETIC_TEST_DATA", "1")

import lightning  # noqa: E402
import pytest  # noqa: E402

from edm_lightning.data.fetch import fetch  # noqa: E402
from tests.helpers.files import REPO_ROOT, save_checkpoint, write_fake_mnist_like  # noqa: E402
from tests.helpers.victims import EVAL_SIZE, CountingVictim, linear_victim, synthetic_images  # noqa: E402


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


@pytest.fixture
def fresh_wandb_session():
    """W&B reads its environment once per process session; tear it down so each test sees its own."""
    import wandb

    wandb.teardown()  # an earlier test may have started a (disabled) session in this process
    yield
    wandb.teardown()


@pytest.fixture
def checkpoint_factory(tmp_path):
    def make(module: lightning.LightningModule, name: str = "model.ckpt", **hparam_overrides) -> str:
        return str(save_checkpoint(module, tmp_path / name, **hparam_overrides))

    return make


@pytest.fixture
def victim() -> CountingVictim:
    return CountingVictim(linear_victim())


@pytest.fixture
def fake_data(monkeypatch):
    """Serve synthetic images for every dataset name the attacks load (victim test/train, surrogate)."""
    sizes = {("fashionmnist", True): (600, 1, False), ("fashionmnist", False): (EVAL_SIZE, 2, False),
             ("mnist", True): (800, 3, True), ("mnist", False): (100, 4, True)}

    def load_images(name, root, train, input_shape=None):
        n, seed, mix = sizes[(name, train)]
        return synthetic_images(n, seed, mix)

    monkeypatch.setattr("edm_lightning.attacks.datamodule.load_images", load_images)
    monkeypatch.setattr("edm_lightning.attacks.datamodule.require_fetched", lambda names, root: None)  # served above
    return sizes
