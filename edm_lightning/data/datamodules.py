"""DataModules: labelled in-distribution data, and unlabelled OOD / surrogate data.

Both expose ``num_classes``, ``input_shape``, ``mean`` and ``std`` as properties, which the CLI links
into the model's arguments, so no config types a class count or a shape twice.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from edm_lightning.data.images import ImageTensorDataset, batch_loader, load_images
from edm_lightning.data.datasets import DatasetSpec, get_spec
from edm_lightning.errors import ConfigError

__all__ = [
    "LINKED_ARGUMENTS",
    "ClassificationDataModule",
    "LinkedSpec",
    "OODDataModule",
    "ProbeDataModule",
    "check_positive",
    "check_split_sizes",
    "seeded_indices",
]


#: What LightningCLI links from every DataModule into the model's arguments (``EDMLightningCLI``).
LINKED_ARGUMENTS = ("num_classes", "input_shape", "mean", "std")


class LinkedSpec:
    """``num_classes``, ``input_shape``, ``mean`` and ``std`` of the dataset in ``self.spec``: the values the
    CLI links from every DataModule into the model's arguments."""

    spec: DatasetSpec

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.input_shape

    @property
    def mean(self) -> tuple[float, ...]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.spec.std


class ClassificationDataModule(LinkedSpec, L.LightningDataModule):
    """A labelled dataset from the registry: seeded train/val split of the train set, and the test set.

    Args:
        dataset: registry name (``python -m edm_lightning.data list``).
        root: data root the dataset was fetched into.
        batch_size: batch size of every loader.
        val_size: images held out of the training split for validation.
        train_size: use only this many (seeded, random) training images; ``None`` for all.
        test_size: evaluate on only the first this-many test images; ``None`` for all.
        augment: random crop and horizontal flip (for 32x32 colour data; off for digits and clothes).
        num_workers: DataLoader workers.
        seed: seed of the split and subset draws (independent of the training seed).
    """

    def __init__(
        self,
        dataset: str = "fashionmnist",
        root: str = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        augment: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.spec = get_spec(dataset)  # unknown names fail here, before any training starts
        check_positive(batch_size=batch_size, train_size=train_size, test_size=test_size)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ConfigError(f"val_size must be a whole number >= 0 (0: no validation split), got {val_size!r}")
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = load_images(hp.dataset, hp.root, train=True)
            check_split_sizes(len(images), hp.val_size, hp.train_size)
            val_idx, train_idx = seeded_indices(len(images), hp.val_size, hp.train_size, hp.seed)
            transform = _augmentation(self.input_shape) if hp.augment else None
            self.train_set = ImageTensorDataset(images[train_idx], labels[train_idx], transform)
            self.val_set = ImageTensorDataset(images[val_idx], labels[val_idx])
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = load_images(hp.dataset, hp.root, train=False)
            if hp.test_size is not None:
                images, labels = images[: hp.test_size], labels[: hp.test_size]
            self.test_set = ImageTensorDataset(images, labels)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def _loader(self, dataset: ImageTensorDataset, shuffle: bool = False) -> DataLoader:
        return _loader(dataset, self.hparams.batch_size, shuffle, self.hparams.num_workers)


class OODDataModule(L.LightningDataModule):
    """Unlabelled out-of-distribution images, converted to the in-distribution ``input_shape``.

    The train split feeds the defender's diversity term (or an attacker's surrogate queries); the test
    split is held out, e.g. to measure the ensemble's coherence on OOD data it never trained on.
    Loaders yield image batches only: labels of OOD data are never used.

    Args:
        dataset: registry name of the OOD set.
        input_shape: (channels, height, width) of the victim's inputs; images are converted to it.
        root: data root.
        batch_size: batch size of every loader.
        train_size: use only this many (seeded, random) training images; ``None`` for all.
        holdout_size: use only the first this-many held-out (test split) images; ``None`` for all.
        num_workers: DataLoader workers.
        seed: seed of the subset draw.
    """

    def __init__(
        self,
        dataset: str = "animal-mnist",
        input_shape: tuple[int, int, int] = (1, 28, 28),
        root: str = "data",
        batch_size: int = 128,
        train_size: int | None = None,
        holdout_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.spec = get_spec(dataset)
        check_positive(batch_size=batch_size, train_size=train_size, holdout_size=holdout_size)
        if len(input_shape) != 3:
            raise ConfigError(f"input_shape must be (channels, height, width), got {input_shape}")
        self.save_hyperparameters()
        self.train_set = self.holdout_set = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.hparams.input_shape)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None:
            images, _ = load_images(hp.dataset, hp.root, train=True, input_shape=self.input_shape)
            _, keep = seeded_indices(len(images), 0, hp.train_size, hp.seed)
            self.train_set = ImageTensorDataset(images[keep])
        if self.holdout_set is None:
            images, _ = load_images(hp.dataset, hp.root, train=False, input_shape=self.input_shape)
            self.holdout_set = ImageTensorDataset(images[: hp.holdout_size])

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.hparams.batch_size, True, self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.holdout_set, self.hparams.batch_size, False, self.hparams.num_workers)

    test_dataloader = val_dataloader


ProbeSet = Literal["test", "ood", "surrogate"]


class ProbeDataModule(LinkedSpec, L.LightningDataModule):
    """The image sets a trained defense is probed with, unlabelled, as test loaders in the order of ``sets``.

    ``test``: the defender's test images (the first ``test_size``); ``ood``: held-out images of the defender's
    OOD set (its test split, the first ``images``); ``surrogate``: the attacker's images (the surrogate's
    training split, the first ``images``). OOD and surrogate images are converted to the defender's input shape.

    Args:
        dataset: the defender's dataset (also the shape and class count linked into the model).
        sets: which sets, in loader order.
        ood_dataset: the defender's OOD set (for ``ood``).
        surrogate: the attacker's surrogate set (for ``surrogate``).
        root: data root.
        test_size: probe with only the first this-many test images (``None``: all).
        images: OOD and surrogate images probed.
        batch_size: images per batch.

    Raises:
        ConfigError: an unknown dataset, a set without its dataset, or sizes that are not positive.
    """

    def __init__(
        self,
        dataset: str = "fashionmnist",
        sets: list[ProbeSet] = ("test", "ood", "surrogate"),
        ood_dataset: str | None = "animal-mnist",
        surrogate: str | None = "mnist",
        root: str = "data",
        test_size: int | None = None,
        images: int = 10_000,
        batch_size: int = 1024,
    ):
        super().__init__()
        self.spec = get_spec(dataset)
        check_positive(test_size=test_size, images=images, batch_size=batch_size)
        self.sets = list(sets)
        if not self.sets or len(set(self.sets)) != len(self.sets) or not set(self.sets) <= {"test", "ood", "surrogate"}:
            raise ConfigError(f"sets must name each of test, ood, surrogate at most once, and at least one, got {self.sets}")
        for name, source in (("ood", ood_dataset), ("surrogate", surrogate)):
            if name in self.sets and source is None:
                raise ConfigError(f"sets include {name!r} but {'ood_dataset' if name == 'ood' else 'surrogate'} is None")
            if source is not None:
                get_spec(source)
        self.save_hyperparameters()
        self.probes: dict[str, ImageTensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        reads = {"test": lambda: load_images(hp.dataset, hp.root, train=False)[0][: hp.test_size],
                 "ood": lambda: load_images(hp.ood_dataset, hp.root, train=False, input_shape=self.input_shape)[0][: hp.images],
                 "surrogate": lambda: load_images(hp.surrogate, hp.root, train=True, input_shape=self.input_shape)[0][: hp.images]}
        for name in self.sets:
            if name not in self.probes:
                self.probes[name] = ImageTensorDataset(reads[name]())

    def test_dataloader(self) -> list[DataLoader]:
        return [_loader(self.probes[name], self.hparams.batch_size, False, 0) for name in self.sets]


def check_split_sizes(available: int, val_size: int, train_size: int | None) -> None:
    """Refuse a validation hold-out or a training subset that the training split (``available`` images) cannot give.

    Raises:
        ConfigError: what was asked for, and how many images there are.
    """
    if val_size >= available:
        raise ConfigError(f"val_size={val_size} leaves no training images ({available} in all)")
    if train_size is not None and train_size > available - val_size:
        raise ConfigError(f"train_size={train_size} asks for more training images than the {available - val_size} "
                          f"left after val_size={val_size} ({available} in all)")


def seeded_indices(n: int, first: int, second: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Two disjoint random index sets of ``range(n)``: ``first`` indices, then ``second`` (``None``: the rest).

    Drawn from a generator of its own, so the split does not depend on the global training seed.

    Returns:
        ``(first_indices, second_indices)``, int64 tensors.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest = perm[first:]
    if second is not None:
        if second > len(rest):
            raise ConfigError(f"asked for {second} images but only {len(rest)} are available")
        rest = rest[:second]
    return perm[:first], rest


def _augmentation(input_shape: tuple[int, int, int]) -> v2.Compose:
    _, height, width = input_shape
    return v2.Compose([v2.RandomCrop((height, width), padding=4), v2.RandomHorizontalFlip()])


def _loader(dataset: ImageTensorDataset | None, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    if dataset is None:
        raise RuntimeError("DataModule.setup() has not run for this stage")
    return batch_loader(dataset, batch_size, shuffle, num_workers)


def check_positive(**values: int | None) -> None:
    """Refuse a size or batch size that is not positive (``None``: all, where the argument allows it).

    Raises:
        ConfigError: the first such value, by name.
    """
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be a positive integer (or null for all), got {value}")
