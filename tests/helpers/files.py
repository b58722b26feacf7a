"""Files the tests build: synthetic datasets in torchvision's layout, committed configs made local, checkpoints.

Synthetic data lives only in ``tests/helpers`` (here and in ``victims.py``), for unit tests; integration
tests use real datasets fetched by the project's own fetch command.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import torch
import yaml

from edm_lightning.data.fetch import _write_idx

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Trainer options that make a CLI fit take seconds.
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def write_fake_mnist_like(root: Path, folder: str, n_train: int = 240, n_test: int = 60, classes: int = 10,
                          seed: int = 0) -> Path:
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


def localise_config(config: str | Path, tmp_path: Path, data_root: Path) -> Path:
    """A copy of a committed config whose outputs go under ``tmp_path`` and data comes from ``data_root``.

    Every string value starting with ``runs/`` is moved under ``tmp_path``; every ``root: data`` points
    at ``data_root``. Tests run the real configs, only writing where pytest cleans up.
    """
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


def save_victim(local: Path, members: int = 2) -> None:
    """Fresh checkpoints at every path a (localised) attack config's victim names: a target, or an ensemble of
    ``members`` behind a router, its hash network, its post-processors' models."""
    from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule

    victim = yaml.safe_load(local.read_text())["data"]["init_args"]["victim"]

    def save(module: lightning.LightningModule, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(module, Path(path))

    save(EnsembleModule(num_members=members) if victim.get("router", "fixed") != "fixed" else ClassifierModule(),
         victim["checkpoint"])
    if victim.get("hash_checkpoint"):
        save(ClassifierModule(), victim["hash_checkpoint"])
    for spec in victim.get("postprocessors", []):
        for value in spec.get("init_args", {}).values():
            if str(value).endswith(".ckpt"):
                save(MisinformationModule(), value)
