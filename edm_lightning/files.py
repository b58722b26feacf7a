"""Files written so a kill never leaves half of one, and digests that name things by their content.

Every result, cache and table in the package is written here: through a temporary file in the same
folder and an atomic rename, so a reader sees the old file or the whole new one. Stage folders and
attack caches are named by :func:`digest` of the configuration that decides their content.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["digest", "file_digest", "save_atomic", "state_digest", "to_plain", "write_atomic"]


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and a rename: a killed run leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def digest(value: Any, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value``'s canonical JSON (sorted keys, no spaces).

    ``value`` may hold dataclasses, mappings, sequences and paths; anything else is written as ``str``.

    Returns:
        ``length`` lowercase hex digits.

    Example:
        >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
        True
        >>> len(digest("x", length=16))
        16
    """
    canonical = json.dumps(to_plain(value), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and tensor bytes, hex): equal weights, equal digest."""
    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def to_plain(value: Any) -> Any:
    """``value`` as JSON-able data: dataclasses as dicts, tuples as lists, paths as strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _temporary(path: Path) -> Path:
    # Hidden, per process: concurrent writers never share one, and a killed writer's is recognisable.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
