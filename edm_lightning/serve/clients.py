"""Who may query the server, and how much: a clients file of names, key digests and budgets.

The file holds the SHA-256 of each API key, never the key, so neither it nor the ledger, logs or config dumps
can leak one. ``python -m edm_lightning.serve add-client --file clients.yaml --name alice --budget 50000`` makes a
random key, records its digest and prints the key once::

    clients:
      - {name: alice, key_sha256: 9f86d081..., budget: 50000}
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from edm_lightning.errors import ConfigError
from edm_lightning.files import write_atomic

__all__ = ["Client", "add_client", "key_digest", "load_clients"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Client:
    """One API client: a public name (what the ledger counts under), its key's digest and its query budget."""

    name: str
    key_sha256: str
    budget: int


def key_digest(key: str) -> str:
    """SHA-256 of an API key (hex): what the clients file stores."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_clients(path: str | Path) -> dict[str, Client]:
    """The clients file as ``{key digest: client}``.

    Returns:
        One entry per client.

    Raises:
        ConfigError: a missing or malformed file, a bad name, digest or budget, or a name or key used twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"clients file {str(path)!r} does not exist: create it with "
                          f"`python -m edm_lightning.serve add-client --file {path} --name NAME --budget QUERIES`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"clients file {str(path)!r} is not readable YAML: {err}") from None
    entries = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"clients file {str(path)!r} must hold `clients:`, a non-empty list of {{name, key_sha256, budget}}")
    clients: dict[str, Client] = {}
    for position, entry in enumerate(entries):
        where = f"clients file {str(path)!r}, entry {position}"
        if not isinstance(entry, dict) or set(entry) != {"name", "key_sha256", "budget"}:
            raise ConfigError(f"{where}: expected exactly name, key_sha256 and budget, got {entry!r}")
        name, digest, budget = entry["name"], str(entry["key_sha256"]).lower(), entry["budget"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        if not _DIGEST.match(digest):
            raise ConfigError(f"{where}: key_sha256 must be 64 hex digits (the SHA-256 of the key, not the key)")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"{where}: budget must be a whole number of queries >= 0, got {budget!r}")
        if digest in clients or name in {c.name for c in clients.values()}:
            raise ConfigError(f"{where}: client {name!r} or its key appears twice")
        clients[digest] = Client(name, digest, budget)
    return clients


def add_client(path: str | Path, name: str, budget: int) -> str:
    """Add a client with a new random key to the clients file (created if missing).

    The read, the check and the write happen under a lock file beside it (``clients.yaml.lock``), and the
    file is replaced atomically: concurrent calls each add their client, and a reader sees the old file or the
    new one.

    Returns:
        The new key (shown to the operator once; only its digest is stored).

    Raises:
        ConfigError: the name is taken or invalid, or the file is malformed.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"clients file {str(path)!r} is not a file (a folder?): name the YAML file to write")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"client name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"budget must be a whole number of queries >= 0, got {budget!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):  # another add-client's read-modify-write waits for this one
        entries = [asdict(c) for c in load_clients(path).values()] if path.is_file() else []
        if any(entry["name"] == name for entry in entries):
            raise ConfigError(f"client {name!r} is already in {str(path)!r}; choose another name")
        key = secrets.token_urlsafe(32)
        entries.append({"name": name, "key_sha256": key_digest(key), "budget": budget})
        write_atomic(path, yaml.safe_dump({"clients": entries}, sort_keys=False))  # checked above: the file loads
    return key
