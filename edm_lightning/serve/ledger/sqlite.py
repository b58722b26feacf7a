"""Queries counted per client in SQLite, committed before the answer leaves the server: one host, many processes.

A client is counted under its name in the clients file (renaming a client starts a new count; giving an existing
name a new key keeps the count).

Each charge is one ``BEGIN IMMEDIATE`` transaction (the database's write lock), so concurrent requests,
threads and server processes sharing the file never spend past a budget together, and a count is on disk
(``synchronous=FULL``) before the model answers: a crash or ``SIGKILL`` loses no answered query. A batch
that does not fit the remaining budget is refused whole and counts nothing. Rate-limit state (table
``rate_limits``) is shared the same way, but not synced to disk on every request: losing it in a power cut only
refills the buckets.

Only a path where nothing exists starts a new ledger, made whole under a temporary name and then linked into
place, so a ledger file is never empty. A file that is not such a ledger (empty, not SQLite, damaged, no tables,
another schema or another program's tables, a count that is not a whole number >= 0) is refused when the ledger
is opened, before anything is served: starting over would forget every client's spent queries. A ledger written
before rate limits existed (only ``spent``) gains the ``rate_limits`` table when opened. A link is followed
first, so the ledger, its journal and its temporary file lie beside the file it points to; a link to nothing is
refused too.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edm_lightning.errors import ConfigError
from edm_lightning.serve.ledger.base import Bucket, BudgetExhausted, LedgerUnavailable, gcra

__all__ = ["SqliteLedger"]

# name -> (columns as PRAGMA table_info gives them: name, type, not null, primary key; the CREATE TABLE body)
_TABLES = {
    "spent": ([("client", "TEXT", 0, 1), ("queries", "INTEGER", 1, 0)], "client TEXT PRIMARY KEY, queries INTEGER NOT NULL"),
    "rate_limits": ([("bucket", "TEXT", 0, 1), ("tat", "REAL", 1, 0)], "bucket TEXT PRIMARY KEY, tat REAL NOT NULL"),
}


def _ledger_problem(db: sqlite3.Connection) -> str | None:
    """What makes ``db`` something other than a query ledger, or ``None``."""
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if not tables:
        return "it holds no tables (an empty database)"
    if "spent" not in tables or not set(tables) <= set(_TABLES):
        return f"it holds the tables {sorted(tables)}, not only a query ledger's {sorted(_TABLES)}"
    for table in tables:
        expected, body = _TABLES[table]
        info = db.execute(f"PRAGMA table_info({table})")
        columns = [(name, kind.upper(), notnull, pk) for _, name, kind, notnull, _, pk in info]
        if columns != expected:
            return f"its table {table!r} has the columns {[c[0] + ' ' + c[1] for c in columns]}, not ({body})"
    check = db.execute("PRAGMA quick_check").fetchall()
    if check != [("ok",)]:
        return f"SQLite finds it damaged: {check[0][0]}"
    bad = db.execute("SELECT client, queries FROM spent WHERE typeof(client) != 'text' OR typeof(queries) != 'integer' "
                     "OR queries < 0 LIMIT 1").fetchone()
    if bad is not None:
        return f"client {bad[0]!r} has spent {bad[1]!r} queries, not a whole number >= 0"
    return None


class SqliteLedger:
    """Per-client query counts and rate-limit buckets in a SQLite file (created with its folder).

    Args:
        path: the database file; a restart with the same file continues every count.
        timeout_s: how long a charge waits for another writer's lock before failing (:class:`LedgerUnavailable`).
        clock: seconds since the epoch for rate limits (every process on the host shares the wall clock).

    Raises:
        ConfigError: ``path`` cannot be opened or is not a query ledger (see the module's docstring).
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.timeout_s, self.clock = timeout_s, clock
        try:
            self.path = Path(path).resolve()  # a link and its target: one ledger, its journal beside the target
            if Path(path).is_symlink() and not self.path.exists():
                raise ConfigError(f"the ledger {str(path)!r} is a link to {str(self.path)!r}, which does not exist: a new "
                                  "ledger there would restart every client's spent queries at 0: restore the file it "
                                  "points to (or mount its folder), or remove the link to start a new ledger knowingly")
            if not self.path.exists():
                self._create()
            if self.path.is_dir():
                raise ConfigError(f"the ledger {str(path)!r} is a folder, not a ledger file: name the SQLite file "
                                  f"(e.g. {str(Path(path) / 'ledger.sqlite')!r})")
            if not self.path.is_file():
                raise ConfigError(f"the ledger {str(path)!r} is not a regular file (a device or a pipe?): name the "
                                  "SQLite file of the query ledger")
            if self.path.stat().st_size == 0:
                raise ConfigError(f"the ledger {str(path)!r} is an empty file: opened as a ledger, every client's spent "
                                  "queries would restart at 0: restore it from a backup, or delete it to start a new "
                                  "ledger knowingly")
            db = self._connect()
            try:
                problem = _ledger_problem(db)  # read only: a foreign file is not changed
                if problem is None:
                    db.execute("PRAGMA journal_mode=WAL")  # a ledger made by hand, in another journal mode
                    db.execute(f"CREATE TABLE IF NOT EXISTS rate_limits ({_TABLES['rate_limits'][1]})")  # an older ledger
            finally:
                db.close()
        except (sqlite3.Error, OSError, RuntimeError) as err:  # RuntimeError: a link loop (Python < 3.13)
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            raise ConfigError(f"the ledger {str(path)!r} is not a readable query ledger ({problem}): restore it from "
                              "a backup, or name another --ledger file (a new ledger forgets every client's spent queries)")
        # Held open, idle, while the ledger is: the last connection to close would checkpoint the WAL, syncing
        # the file on every call (about 50 calls/s on a slow disk instead of thousands).
        self._anchor = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._anchor.execute("SELECT count(*) FROM spent").fetchall()  # opens the WAL index, holds no lock after

    def _create(self) -> None:
        """A new, empty ledger at ``self.path``, made under a temporary name and linked into place: never seen
        half-made (or empty), and a ledger another process created meanwhile is kept.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        try:
            db = sqlite3.connect(name, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # kept in the file
                for table, (_, body) in _TABLES.items():
                    db.execute(f"CREATE TABLE {table} ({body})")
            finally:
                db.close()
            try:
                os.link(name, self.path)  # never replaces: a ledger another process made first is kept
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not self.path.exists():
                    os.replace(name, self.path)
        finally:
            Path(name).unlink(missing_ok=True)

    def _connect(self, synchronous: str = "FULL") -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)  # transactions by hand
        db.execute(f"PRAGMA synchronous={synchronous}")
        return db

    @contextmanager
    def _write(self, synchronous: str = "FULL") -> Iterator[sqlite3.Connection]:
        """One write transaction under the file's write lock (``BEGIN IMMEDIATE``): committed when the block ends,
        rolled back if it raises (a refused batch included); a database error becomes :class:`LedgerUnavailable`.
        """
        try:
            db = self._connect(synchronous=synchronous)
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                db.close()
        except sqlite3.Error as err:
            raise self._unavailable(err) from err

    def _unavailable(self, err: sqlite3.Error) -> LedgerUnavailable:
        return LedgerUnavailable(f"the SQLite ledger {str(self.path)!r} cannot be used ({type(err).__name__}: {err})")

    def describe(self) -> str:
        """``SQLite <path>``."""
        return f"SQLite {self.path}"

    def close(self) -> None:
        """Close the idle connection held open; each call opens and closes its own (safe across ``fork``)."""
        self._anchor.close()

    def __del__(self):
        anchor = getattr(self, "_anchor", None)  # a ledger refused in __init__ has none
        if anchor is not None:
            anchor.close()  # now, not whenever the garbage collector finds the connection's own reference cycle

    def spent(self, client: str) -> int:
        """Queries charged to ``client`` so far."""
        try:
            db = self._connect()
            try:
                row = db.execute("SELECT queries FROM spent WHERE client = ?", (client,)).fetchone()
            finally:
                db.close()
        except sqlite3.Error as err:
            raise self._unavailable(err) from err
        return 0 if row is None else int(row[0])

    def spent_by_client(self) -> dict[str, int]:
        """Queries charged so far, by client name."""
        try:
            db = self._connect()
            try:
                rows = db.execute("SELECT client, queries FROM spent").fetchall()
            finally:
                db.close()
        except sqlite3.Error as err:
            raise self._unavailable(err) from err
        return {client: int(queries) for client, queries in rows}

    def charge(self, client: str, count: int, budget: int) -> int:
        """Count ``count`` queries for ``client`` if they fit ``budget``; committed when this returns.

        Returns:
            The client's queries spent, this batch included.

        Raises:
            BudgetExhausted: the batch does not fit; nothing was counted.
            LedgerUnavailable: the file cannot be written (locked past ``timeout_s``, disk full...); nothing counted.
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._write() as db:
            row = db.execute("SELECT queries FROM spent WHERE client = ?", (client,)).fetchone()
            spent = 0 if row is None else int(row[0])
            if spent + count > budget:
                raise BudgetExhausted(client, spent, budget, count)  # rolled back: nothing counted
            db.execute("INSERT INTO spent (client, queries) VALUES (?, ?) "
                       "ON CONFLICT(client) DO UPDATE SET queries = excluded.queries", (client, spent + count))
        return spent + count

    def refund(self, client: str, count: int) -> None:
        """Give back ``count`` queries charged for a batch the server then failed to answer.

        Raises:
            LedgerUnavailable: the file cannot be written.
        """
        try:
            db = self._connect()
            try:
                db.execute("UPDATE spent SET queries = MAX(queries - ?, 0) WHERE client = ?", (count, client))
            finally:
                db.close()
        except sqlite3.Error as err:
            raise self._unavailable(err) from err

    def admit(self, buckets: Sequence[Bucket]) -> float:
        """Take every bucket's cost at once, or none (:func:`~edm_lightning.serve.ledger.base.gcra`), under the
        file's write lock: every process on the file shares the buckets.

        Returns:
            0.0 when admitted; else the seconds until the request would fit (nothing consumed).

        Raises:
            LedgerUnavailable: the file cannot be written.
            ValueError: a cost above its bucket's burst.
        """
        if not buckets:
            return 0.0
        names = [bucket.name for bucket in buckets]
        with self._write(synchronous="NORMAL") as db:  # WAL + NORMAL: survives a process crash, not a power cut
            rows = db.execute(f"SELECT bucket, tat FROM rate_limits WHERE bucket IN ({', '.join('?' * len(names))})",
                              names).fetchall()
            wait, tats = gcra(buckets, dict(rows), self.clock())
            if tats:
                db.executemany("INSERT INTO rate_limits (bucket, tat) VALUES (?, ?) "
                               "ON CONFLICT(bucket) DO UPDATE SET tat = excluded.tat", list(tats.items()))
        return wait
