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
from jsonargparse.typing import SecretStr
from torch import nn

__all__ = [
    "SHIPPED_CONFIGS",
    "Secret",
    "cached_file_digest",     "digest",
    "file_digest",
    "save_atomic",
    "state_digest",
    "to_plain",
    "write_atomic",
]

#: The committed configs, shipped inside the package (in a clone, a link to ``configs/``): found by name from any
#: folder, and read for the checkpoint files their jobs write.
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


class Secret:
    """A value a digest must depend on but no file may show: :func:`digest` hashes ``value``,
    :func:`to_plain` (what ``config.json`` files hold) writes ``label`` instead.

    Args:
        value: the secret, as hashed.
        label: what files show in its place (a fingerprint, never the value).
    """

    def __init__(self, value: str, label: str):
        self._value, self.label = value, label

    def reveal(self) -> str:
        """The secret itself (for digests only)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.label!r})"

    def __deepcopy__(self, memo: dict) -> Secret:
        return self


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


def digest(value: Any, length: int = 12, separators: tuple[str, str] = (",", ":")) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value``'s canonical JSON (sorted keys, no spaces).

    ``value`` may hold dataclasses, mappings, sequences and paths; anything else is written as ``str``.
    ``separators`` are json's: attack caches were named with json's default ``(", ", ": ")`` and keep it, so
    a cache bought by an earlier version is found (and charged) instead of bought again.

    Returns:
        ``length`` lowercase hex digits.

    Example:
        >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
        True
        >>> len(digest("x", length=16))
        16
    """
    canonical = json.dumps(to_plain(value, reveal=True), sort_keys=True, separators=separators, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def cached_file_digest(path: str | Path) -> str:
    """:func:`file_digest`, computed once per process for a file of unchanged size and modification time (checking a
    dataset or a stage's checkpoints again on every load would read them again).

    Returns:
        The SHA-256 of the file's bytes (hex).
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime) -> SHA-256, for cached_file_digest


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names and tensor bytes, hex): equal weights, equal digest."""
    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def to_plain(value: Any, reveal: bool = False) -> Any:
    """``value`` as JSON-able data: dataclasses as dicts, tuples as lists, paths as strings.

    Args:
        value: the data.
        reveal: write each :class:`Secret` as its value (for digests) instead of its label (for files); a
            jsonargparse ``SecretStr`` is left as it is for digests (they always hashed it so) and written as ``None``.

    Returns:
        Dicts, lists and scalars only (anything else is left for ``json.dumps(default=str)``).
    """
    if isinstance(value, Secret):
        return value.reveal() if reveal else value.label
    if isinstance(value, SecretStr):
        return value if reveal else None
    if is_dataclass(value) and not isinstance(value, type):
        return to_plain(asdict(value), reveal)
    if isinstance(value, dict):
        return {str(k): to_plain(v, reveal) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, reveal) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _temporary(path: Path) -> Path:
    # Hidden, per process: concurrent writers never share one, and a killed writer's is recognisable.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
