"""The EDM defender's data: labelled in-distribution batches paired with unlabelled OOD batches."""

from __future__ import annotations

from functools import cached_property

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from edm_lightning.data.datamodules import ClassificationDataModule, LinkedSpec, OODDataModule, check_positive
from edm_lightning.data.datasets import get_spec, require_fetched
from edm_lightning.errors import ConfigError

__all__ = ["EDMDataModule"]


class EDMDataModule(LinkedSpec, L.LightningDataModule):
    """A :class:`ClassificationDataModule` and an :class:`OODDataModule` in the in-distribution input shape.

    Training batches are dicts ``{"id": (x, y), "ood": x_ood}``: the OOD loader cycles until the
    in-distribution epoch ends (``max_size_cycle``), so an epoch is one pass over the labelled data.
    Validation and test have two loaders: ``[in-distribution, held-out OOD]`` (the OOD test split,
    never seen in training), so the ensemble's coherence is measured on both.

    The OOD set must differ from the in-distribution set, and in experiments also from the attacker's
    surrogate set (a defender who trained diversity on the attacker's own queries would flatter itself).

    Args:
        dataset: in-distribution registry name.
        ood_dataset: OOD registry name for the diversity term (Animal-MNIST offline, KMNIST in the paper).
        root: data root.
        batch_size: in-distribution batch size.
        ood_batch_size: OOD batch size (``None``: same as ``batch_size``).
        val_size: in-distribution training images held out for validation.
        train_size: use only this many in-distribution training images (``None``: all).
        test_size: evaluate on only the first this-many in-distribution test images (``None``: all).
        ood_train_size: use only this many OOD training images (``None``: all).
        ood_holdout_size: use only the first this-many held-out OOD images (``None``: all).
        augment: random crop and flip of in-distribution images (32x32 colour data).
        num_workers: DataLoader workers of each loader.
        seed: seed of the split and subset draws.
    """

    def __init__(
        self,
        dataset: str = "fashionmnist",
        ood_dataset: str = "animal-mnist",
        root: str = "data",
        batch_size: int = 128,
        ood_batch_size: int | None = None,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        ood_train_size: int | None = None,
        ood_holdout_size: int | None = None,
        augment: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if ood_dataset == dataset:
            raise ConfigError(
                f"ood_dataset must differ from the in-distribution dataset, both are {dataset!r}: "
                "diversity on in-distribution data would fight the accuracy term"
            )
        check_positive(batch_size=batch_size, ood_batch_size=ood_batch_size, train_size=train_size, test_size=test_size,
                       ood_train_size=ood_train_size, ood_holdout_size=ood_holdout_size)
        self.spec = get_spec(dataset)
        get_spec(ood_dataset)  # unknown names fail here, before any training starts
        self.save_hyperparameters()

    # The two DataModules are built on first use, not in __init__: LightningCLI instantiates this class
    # inside a context that hands *its* hyper-parameters to every save_hyperparameters() call, which
    # would give the inner modules the wrong ones.
    @cached_property
    def id_data(self) -> ClassificationDataModule:
        hp = self.hparams
        return ClassificationDataModule(
            hp.dataset, hp.root, hp.batch_size, hp.val_size, hp.train_size, hp.test_size, hp.augment,
            hp.num_workers, hp.seed,
        )

    @cached_property
    def ood_data(self) -> OODDataModule:
        hp = self.hparams
        return OODDataModule(
            hp.ood_dataset, self.input_shape, hp.root, hp.ood_batch_size or hp.batch_size, hp.ood_train_size,
            hp.ood_holdout_size, hp.num_workers, hp.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        require_fetched([self.hparams.dataset, self.hparams.ood_dataset], self.hparams.root)  # both named if missing
        self.id_data.setup(stage)
        self.ood_data.setup(stage)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"id": self.id_data.train_dataloader(), "ood": self.ood_data.train_dataloader()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self.id_data.val_dataloader(), self.ood_data.val_dataloader()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.id_data.test_dataloader(), self.ood_data.test_dataloader()]

    def predict_dataloader(self) -> DataLoader:
        return self.id_data.predict_dataloader()
