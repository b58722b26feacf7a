from pathlib import Path

import pytest

from edm_lightning.data import DATASETS, DatasetNotFoundError, get_spec, open_dataset
from edm_lightning.errors import ConfigError


def test_every_dataset_the_issue_names_is_registered():
    assert {"mnist", "fashionmnist", "kmnist", "emnist-letters", "cifar10", "cifar100", "svhn", "animal-mnist"} <= set(DATASETS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_spec_is_consistent(name):
    spec = get_spec(name)
    channels = spec.input_shape[0]
    assert len(spec.mean) == len(spec.std) == channels
    assert all(s > 0 for s in spec.std)
    assert spec.num_classes >= 10


def test_emnist_letters_has_26_classes():
    assert get_spec("emnist-letters").num_classes == 26


def test_unknown_name_lists_known_ones():
    with pytest.raises(ConfigError, match="Known datasets: .*fashionmnist"):
        get_spec("fashion-mnist-typo")


def test_missing_root_names_fetch_command(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="python -m edm_lightning.data fetch mnist --root"):
        open_dataset("mnist", tmp_path / "nowhere", train=True)


def test_missing_files_name_fetch_command(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="fetch fashionmnist"):
        open_dataset("fashionmnist", tmp_path, train=False)


def test_opens_torchvision_layout(fake_root: Path):
    train = open_dataset("fashionmnist", fake_root, train=True)
    test = open_dataset("fashionmnist", fake_root, train=False)
    assert (len(train), len(test)) == (240, 60)
    assert len(open_dataset("animal-mnist", fake_root, train=True)) == 120
