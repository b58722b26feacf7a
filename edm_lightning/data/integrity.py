"""Is a fetched dataset still what was fetched? SHA-256 manifests written by ``fetch`` and checked on every load.

A file of the right size with its pixels zeroed reads without complaint, so sizes and headers prove
nothing. ``fetch`` writes ``<root>/<folder>/checksums.json`` (the SHA-256 of every file it installed or
verified); loading a dataset checks the files against it once per process, and ``fetch`` re-fetches a
dataset whose files no longer match. Where the content is known in advance (FashionMNIST's original
files, the Animal-MNIST split this package makes), ``fetch`` also checks data it finds already present.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edm_lightning.errors import UserError

__all__ = ["MANIFEST", "DatasetCorruptError", "corrupt_files", "manifest_mismatches", "verify_manifest", "write_manifest"]

MANIFEST = "checksums.json"

#: SHA-256 of the raw files whose content is known before fetching (relative to the dataset's folder).
KNOWN = {
    "fashionmnist": {  # the original IDX files (Zalando), as torchvision and Debian ship them, uncompressed
        "raw/t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "raw/t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "raw/train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "raw/train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
    "animal-mnist": {  # the 9,000 / 1,000 split fetch writes from the animal-mnist wheel
        "raw/t10k-images-idx3-ubyte": "14661a643121d938d224b553d778b648c20aafdd02719550087cf96f0d7c12c6",
        "raw/t10k-labels-idx1-ubyte": "269ecbc6b9d1255bfaf6a62a1eba208034491ca4df872ab8c3531975085962c3",
        "raw/train-images-idx3-ubyte": "21a170893db36356c998389834520cd4c097dcc784ef1b78cbc55f4855b9188e",
        "raw/train-labels-idx1-ubyte": "ba4b42e398088fd2660db5ee2369650b9cdf3e7140198bb0338e65dd9c303562",
    },
}

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, so a process hashes a file once


class DatasetCorruptError(UserError, RuntimeError):
    """A dataset's files no longer match what was fetched; the message names them and the command to re-fetch."""


def write_manifest(folder: Path) -> dict[str, str]:
    """Record the SHA-256 of every file under ``folder`` (the dataset's own folder) in its manifest.

    Returns:
        Relative path -> SHA-256 of each file recorded.
    """
    checksums = {str(path.relative_to(folder)): _sha256(path) for path in _files(folder)}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(checksums, indent=2, sort_keys=True))
    tmp.replace(folder / MANIFEST)
    return checksums


def corrupt_files(folder: Path, expected: dict[str, str]) -> list[str]:
    """The files of ``expected`` (relative path -> SHA-256) that are missing under ``folder`` or differ.

    Returns:
        Relative paths, sorted; empty when everything matches.
    """
    bad = []
    for relative, checksum in sorted(expected.items()):
        path = folder / relative
        if not path.is_file() or _sha256(path) != checksum:
            bad.append(relative)
    return bad


def manifest_mismatches(folder: Path) -> list[str] | None:
    """The files under ``folder`` that differ from its manifest (``[MANIFEST]`` itself if it is unreadable).

    Returns:
        Relative paths, sorted (empty: all match), or ``None`` when the folder has no manifest (data fetched
        by an older version).
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return [MANIFEST]
    return corrupt_files(folder, expected) if isinstance(expected, dict) else [MANIFEST]


def verify_manifest(name: str, folder: Path, root: Path) -> None:
    """Check ``folder`` against its manifest, if it has one (data fetched by an older version has none).

    Raises:
        DatasetCorruptError: a file is missing or changed since it was fetched.
    """
    bad = manifest_mismatches(folder)
    if bad == [MANIFEST]:
        raise DatasetCorruptError(f"Dataset {name!r}: its checksum manifest {str(folder / MANIFEST)!r} is unreadable. "
                                  f"Fetch it again: python -m edm_lightning.data fetch {name} --root {root}")
    if bad:
        raise DatasetCorruptError(
            f"Dataset {name!r} is corrupt: {', '.join(bad)} under {str(folder)!r} changed since it was fetched "
            f"(SHA-256 mismatch). Fetch it again: python -m edm_lightning.data fetch {name} --root {root}"
        )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.tmp"))


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        _verified[key] = sha.hexdigest()
    return _verified[key]
