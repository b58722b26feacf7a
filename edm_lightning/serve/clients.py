"""Who may query the server, and how much: a clients file of names, key digests and budgets.

The file holds the SHA-256 of each API key, never the key, so neither it nor the ledger, logs or config dumps
can leak one. ``python -m edm_lightning.serve add-client --file clients.yaml --name alice --budget 50000`` makes a
random key, records its digest and prints the key once::

    clients:
      - {name: alice, key_sha256: 9f86d081..., budget: 50000}

A running server re-reads the file when it changes (:class:`LiveClients`): keys are added, revoked (their entry
removed) and budgets changed without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from edm_lightning.errors import ConfigError
from edm_lightning.files import write_atomic

__all__ = ["Client", "LiveClients", "add_client", "key_digest", "load_clients"]

log = logging.getLogger("edm_lightning.serve")

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
            got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__  # names, never values:
            raise ConfigError(f"{where}: expected exactly name, key_sha256 and budget, got {got}")  # a key pasted in
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
    link keeps pointing at the file. A running server sees the new client within a second (:class:`LiveClients`).

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


class LiveClients:
    """The clients file as a running server sees it: re-read when it changes, and at once on :meth:`wake` (SIGHUP).

    A background thread (:meth:`start`) compares the file's inode, size and modification time every ``poll_s``
    seconds (one ``stat``) and re-reads it when any changed, so a client added, a key revoked (its entry removed)
    or a budget changed is in effect within ``poll_s`` plus a read. A version of the file that does not load (a
    typo, an editor's half-written save) is refused: the server keeps its last good clients and logs one error
    line for it. Requests read the current clients without locking (one reference, replaced whole).

    Args:
        path: the clients file (a link is followed at every read).
        poll_s: seconds between checks.

    Raises:
        ConfigError: the file does not load when the server starts (see :func:`load_clients`).
    """

    def __init__(self, path: str | Path, poll_s: float = 0.25):
        self.path, self.poll_s = path, poll_s
        self._seen = _signature(path)  # before reading: a change during the read shows at the next check
        self._clients = load_clients(path)
        self._refused: tuple | None = None  # (signature,) of the last version refused
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, digest: str) -> Client | None:
        """The client whose key has SHA-256 ``digest``, or ``None``."""
        return self._clients.get(digest)

    def values(self) -> list[Client]:
        """Every current client."""
        return list(self._clients.values())

    def check(self, force: bool = False) -> bool:
        """Re-read the file if it changed since it was last read (or ``force``: SIGHUP).

        Returns:
            Whether the clients were replaced.
        """
        with self._lock:
            before = _signature(self.path)
            if not force and (before == self._seen or (before,) == self._refused):
                return False
            try:
                clients = load_clients(self.path)
            except ConfigError as err:
                if force or (before,) != self._refused:
                    log.error("clients file change refused, still serving the last good %d clients: %s",
                              len(self._clients), err)
                self._refused = (before,)
                return False
            if _signature(self.path) != before:
                return False  # written to while read: read again at the next check
            old, self._clients, self._seen, self._refused = self._clients, clients, before, None
        log.info("clients file reloaded: %s", _changes(old, clients))
        return True

    def wake(self) -> None:
        """Re-read the file now (from a signal handler: only sets an event the watcher waits on)."""
        self._wake.set()

    def start(self) -> None:
        """Watch the file from a background thread until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="clients-file-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the watcher (waits for it)."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=10)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            forced = self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check(force=forced)
            except Exception:  # noqa: BLE001 - the watcher outlives any one bad read; the server keeps its clients
                log.exception("reading the clients file %s failed; still serving the last good clients", self.path)


def _signature(path: str | Path) -> tuple[int, ...] | None:
    """What changes when the file does (inode, size, modification time in ns), or ``None`` where there is no file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _changes(old: dict[str, Client], new: dict[str, Client]) -> str:
    """What a reload changed, by client name (never a key or digest)."""
    before, after = {c.name: c for c in old.values()}, {c.name: c for c in new.values()}
    parts = [f"{len(after)} clients"]
    for what, names in (("added", sorted(after.keys() - before.keys())),
                        ("removed", sorted(before.keys() - after.keys())),
                        ("new key", sorted(n for n in after.keys() & before.keys()
                                           if after[n].key_sha256 != before[n].key_sha256)),
                        ("budget changed", sorted(n for n in after.keys() & before.keys()
                                                  if after[n].budget != before[n].budget))):
        if names:
            parts.append(f"{what}: {', '.join(names)}")
    return "; ".join(parts)
