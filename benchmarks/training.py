"""Training cost of EDM: one ensemble epoch (N members, in-distribution + OOD batches) against N x one
undefended epoch, on the same real data and batch size. Figures are printed, never asserted.

    python benchmarks/training.py                         # FashionMNIST + Animal-MNIST, LeNet-5, N = 5
    python benchmarks/training.py --num_members 3 --train_size 20000

An EDM step runs every member on the in-distribution batch *and* on an OOD batch of the same size, so
the expected ratio to N single-model epochs is about 2 (forward and backward on twice the images).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import lightning as L  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from edm_lightning.data import ClassificationDataModule, EDMDataModule  # noqa: E402
from edm_lightning.models import ClassifierModule, EnsembleModule  # noqa: E402


def main(num_members: int = 5, arch: str = "lenet5", dataset: str = "fashionmnist", ood_dataset: str = "animal-mnist",
         root: str = "data", train_size: int | None = None, batch_size: int = 128, device: str = "cpu") -> None:
    """Print the wall time of one training epoch of each model and their ratio.

    Args:
        num_members: N of the ensemble.
        arch: member architecture.
        dataset: in-distribution dataset.
        ood_dataset: the defender's OOD set.
        root: data root.
        train_size: training images (``None``: the whole training split less 5,000 for validation).
        batch_size: batch size of both models.
        device: ``cpu`` or ``cuda``.
    """
    single_data = ClassificationDataModule(dataset, root, batch_size, train_size=train_size)
    single = ClassifierModule(arch, single_data.num_classes, single_data.input_shape, single_data.mean, single_data.std)
    edm_data = EDMDataModule(dataset, ood_dataset, root, batch_size, train_size=train_size)
    edm = EnsembleModule(arch, num_members, edm_data.num_classes, edm_data.input_shape, edm_data.mean, edm_data.std)
    single_s = _epoch_seconds(single, single_data, device)
    edm_s = _epoch_seconds(edm, edm_data, device)
    print(f"{arch} on {dataset} ({device}, batch {batch_size}):")
    print(f"  undefended epoch          {single_s:8.1f} s")
    print(f"  EDM epoch (N={num_members})          {edm_s:8.1f} s")
    print(f"  EDM / (N x undefended)    {edm_s / (num_members * single_s):8.2f}")


def _epoch_seconds(model: L.LightningModule, data: L.LightningDataModule, device: str) -> float:
    data.setup("fit")  # loading the data is not training time
    trainer = L.Trainer(max_epochs=1, accelerator=device, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


if __name__ == "__main__":
    CLI(main)
