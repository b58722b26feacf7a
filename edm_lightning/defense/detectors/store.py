"""Each client's PRADA history in SQLite, committed before the answers leave: a restart forgets nobody.

A client's history is its queries' rows in order (class, distance, whether it joined its growing set, and then its
8-bit image), so reading them back rebuilds :class:`~edm_lightning.defense.detectors.prada.ClientHistory` exactly;
a flagged client is one row in ``clients`` (its later queries are only counted). Every batch is one
``BEGIN IMMEDIATE`` transaction synced to disk (``synchronous=FULL``), so a kill loses no row of an answered
batch. The settings the histories were built with are stored too: histories built under other settings are
refused, not mixed.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import asdict
from pathlib import Path

import torch

from edm_lightning.defense.detectors.prada import ClientHistory, Prada
from edm_lightning.errors import ConfigError

__all__ = ["DetectorStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (settings TEXT NOT NULL, key BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS clients (client TEXT PRIMARY KEY, queries INTEGER NOT NULL, flagged_at INTEGER,
                                    last_w REAL);
CREATE TABLE IF NOT EXISTS queries (client TEXT NOT NULL, seq INTEGER NOT NULL, class INTEGER NOT NULL,
                                    distance REAL, joined INTEGER NOT NULL, image BLOB,
                                    PRIMARY KEY (client, seq));
"""


class DetectorStore:
    """Where a PRADA defender keeps every client's history (one SQLite file, for one serving process).

    Args:
        path: the file (created with its folder when missing).
        settings: the detector's settings; a file written under other settings is refused.

    Attributes:
        key: the defender's secret for misinformation (:func:`~edm_lightning.defense.detectors.misinform`), 32 random
            bytes made with the store and kept only in it (never logged or written elsewhere).

    Raises:
        ConfigError: the file is not such a store, or holds histories built under other settings.
    """

    def __init__(self, path: str | Path, settings: Prada):
        self.path, self.settings = Path(path), settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # the defender's alone from its first byte: its key and every client's queries
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            stored = self._db.execute("SELECT settings, key FROM settings").fetchall()
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"{str(self.path)!r} is not a PRADA client store ({err}): it holds the defender's client "
                              "histories; name another file, or delete it to forget every client") from None
        wanted = json.dumps(asdict(settings), sort_keys=True)
        if not stored:
            self.key = os.urandom(32)
            self._db.execute("INSERT INTO settings VALUES (?, ?)", (wanted, self.key))
        else:
            self.key = bytes(stored[0][1])
        if stored and stored[0][0] != wanted:
            raise ConfigError(f"{str(self.path)!r} holds client histories built under other PRADA settings ({stored[0][0]}, "
                              f"now {wanted}): keep the settings, or name another file for the new ones")

    def load(self, client: str) -> ClientHistory:
        """The history of ``client`` (empty for a client never seen)."""
        history = ClientHistory(self.settings)
        record = self._db.execute("SELECT queries, flagged_at, last_w FROM clients WHERE client = ?", (client,)).fetchone()
        if record is None:
            return history
        history.queries, history.flagged_at, history.last_w = record
        if history.flagged:
            return history
        rows = self._db.execute("SELECT class, distance, joined, image FROM queries WHERE client = ? ORDER BY seq",
                                (client,)).fetchall()
        images = [torch.frombuffer(bytearray(r[3]), dtype=torch.uint8) for r in rows if r[2]]
        history.replay(torch.stack(images) if images else torch.empty(0, 0, dtype=torch.uint8),
                       [r[0] for r in rows], [math.nan if r[1] is None else r[1] for r in rows], [bool(r[2]) for r in rows])
        return history

    def save(self, client: str, history: ClientHistory, rows: list[tuple[int, int, float, bool]], images: torch.Tensor) -> None:
        """Commit a batch: its new rows (``images``: the batch's uint8 rows, in order) and the client's counts.

        Raises:
            RuntimeError: the store holds another count for the client than ``history`` had before this batch (another
                process answered it meanwhile); nothing is stored, and the caller reads the client back.
            sqlite3.Error: the write failed; nothing of the batch is stored.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            stored = self._db.execute("SELECT queries FROM clients WHERE client = ?", (client,)).fetchone()
            before = history.queries - len(images)
            if (stored[0] if stored else 0) != before:
                raise RuntimeError(f"the detector's store {str(self.path)!r} counts {stored[0] if stored else 0} queries "
                                   f"of client {client!r} where this process counted {before}: another process answers "
                                   "the same client with the same store; serve each store from one process")
            if rows:
                first = rows[0][1]
                self._db.executemany(
                    "INSERT INTO queries VALUES (?, ?, ?, ?, ?, ?)",
                    [(client, seq, c, None if math.isnan(d) else d, int(joined),
                      images[seq - first].numpy().tobytes() if joined else None) for c, seq, d, joined in rows])
            if history.flagged:
                self._db.execute("DELETE FROM queries WHERE client = ?", (client,))  # a flagged client's rows no longer matter
            self._db.execute("INSERT INTO clients VALUES (?, ?, ?, ?) ON CONFLICT (client) DO UPDATE SET "
                             "queries = excluded.queries, flagged_at = excluded.flagged_at, last_w = excluded.last_w",
                             (client, history.queries, history.flagged_at, history.last_w))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def clients(self) -> dict[str, dict]:
        """Every client's ``queries``, ``flagged_at`` and ``last_w``, by name."""
        rows = self._db.execute("SELECT client, queries, flagged_at, last_w FROM clients ORDER BY client").fetchall()
        return {r[0]: {"queries": r[1], "flagged_at": r[2], "last_w": r[3]} for r in rows}

    def close(self) -> None:
        """Close the database."""
        self._db.close()
