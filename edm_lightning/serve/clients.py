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
    """The clients file as ``{key digest: client}`` (``path`` may be a link: the file it points to is read).

    Returns:
        One entry per client.

    Raises:
        ConfigError: a missing or malformed file (a folder included), a bad name, digest or budget, or a name or
            key used twice.
    """
    file = _clients_file(path)  # messages name ``path`` as the operator did
    if not file.is_file():
        raise ConfigError(f"clients file {str(path)!r} does not exist: create it with "
                          f"`python -m edm_lightning.serve add-client --file {path} --name NAME --budget QUERIES`")
    try:
        data = yaml.safe_load(file.read_text()) or {}
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


def _clients_file(path: str | Path) -> Path:
    """The clients file ``path`` names, links followed (it may not exist yet): the one name every reader, writer
    and lock uses, so that a link and its target are one file.

    Returns:
        The absolute path, links resolved.

    Raises:
        ConfigError: ``path`` is a folder or something else that is not a file, or a link that leads nowhere (a loop).
    """
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a link loop (Python < 3.13)
        raise ConfigError(f"clients file {str(path)!r} cannot be resolved ({err}): name the YAML file itself") from None
    if resolved.is_dir():
        raise ConfigError(f"clients file {str(path)!r} is a folder, not a clients file: name the YAML file in it "
                          f"(e.g. {str(Path(path) / 'clients.yaml')!r})")
    if resolved.exists() and not resolved.is_file():
        raise ConfigError(f"clients file {str(path)!r} is not a regular file: name the YAML file of clients")
    return resolved


def add_client(path: str | Path, name: str, budget: int) -> str:
    """Add a client with a new random key to the clients file (created if missing).

    The read, the check and the write happen under a lock file beside it (``clients.yaml.lock``), and the
    file is replaced atomically: concurrent calls each add their client, and a reader sees the old file or the
    new one. A link is followed first, so calls through a link and through the file share one lock and the
    link keeps pointing at the file. A running server sees the new client after a restart.

    Returns:
        The new key (shown to the operator once; only its digest is stored).

    Raises:
        ConfigError: the name is taken or invalid, or the file is malformed.
    """
    file = _clients_file(path)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"client name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"budget must be a whole number of queries >= 0, got {budget!r}")
    file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(file.with_name(file.name + ".lock")):  # another add-client's read-modify-write waits for this one
        entries = [asdict(c) for c in load_clients(file).values()] if file.is_file() else []
        if any(entry["name"] == name for entry in entries):
            raise ConfigError(f"client {name!r} is already in {str(path)!r}; choose another name")
        key = secrets.token_urlsafe(32)
        entries.append({"name": name, "key_sha256": key_digest(key), "budget": budget})
        write_atomic(file, yaml.safe_dump({"clients": entries}, sort_keys=False))  # checked above: the file loads
    return key
