from pathlib import Path

import pytest
import torch

from edm_lightning.data import ClassificationDataModule, OODDataModule
from edm_lightning.data.datamodules import seeded_indices
from edm_lightning.errors import ConfigError


def _fit_split(root: Path, seed: int = 0, **kwargs) -> ClassificationDataModule:
    dm = ClassificationDataModule("fashionmnist", root=str(root), val_size=40, seed=seed, batch_size=16, **kwargs)
    dm.setup("fit")
    return dm


def _rows(dataset) -> set[bytes]:
    return {img.numpy().tobytes() for img in dataset.images}


def test_train_and_val_are_disjoint_and_cover_the_split(fake_root: Path):
    dm = _fit_split(fake_root)
    assert (len(dm.train_set), len(dm.val_set)) == (200, 40)
    assert not _rows(dm.train_set) & _rows(dm.val_set)


def test_split_is_seeded(fake_root: Path):
    a, b, c = _fit_split(fake_root, seed=0), _fit_split(fake_root, seed=0), _fit_split(fake_root, seed=1)
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)


def test_split_does_not_follow_the_global_seed(fake_root: Path):
    torch.manual_seed(123)
    a = _fit_split(fake_root)
    torch.manual_seed(456)
    b = _fit_split(fake_root)
    assert torch.equal(a.train_set.images, b.train_set.images)


def test_train_subset_and_test_subset(fake_root: Path):
    dm = _fit_split(fake_root, train_size=50, test_size=10)
    dm.setup("test")
    assert (len(dm.train_set), len(dm.test_set)) == (50, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_exposes_what_the_model_is_linked_to():
    dm = ClassificationDataModule("fashionmnist")
    assert (dm.num_classes, dm.input_shape, len(dm.mean), len(dm.std)) == (10, (1, 28, 28), 1, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "nope"}, "Unknown dataset"),
        ({"batch_size": 0}, "batch_size must be a positive"),
        ({"val_size": -1}, "val_size must be a whole number >= 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClassificationDataModule(**kwargs)


def test_oversized_subset_is_refused(fake_root: Path):
    with pytest.raises(ConfigError, match="asks for more training images than the 200 left after val_size=40"):
        _fit_split(fake_root, train_size=500)


def test_ood_data_is_converted_to_the_victim_shape_and_unlabelled(fake_root: Path):
    ood = OODDataModule("animal-mnist", input_shape=(3, 32, 32), root=str(fake_root), batch_size=8, holdout_size=10)
    ood.setup()
    batch = next(iter(ood.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (8, 3, 32, 32)
    assert len(ood.train_set) == 120 and len(ood.holdout_set) == 10
    assert ood.input_shape == (3, 32, 32)


def test_seeded_indices_are_disjoint():
    first, rest = seeded_indices(100, 30, None, seed=7)
    assert len(first) == 30 and len(rest) == 70
    assert set(first.tolist()).isdisjoint(rest.tolist())
