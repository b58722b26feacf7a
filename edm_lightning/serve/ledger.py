"""Queries counted per client in SQLite, committed before the answer leaves the server.

A client is counted under its name in the clients file (renaming a client starts a new count; giving an existing
name a new key keeps the count).

Each charge is one ``BEGIN IMMEDIATE`` transaction (the database's write lock), so concurrent requests,
threads and server processes sharing the file never spend past a budget together, and a count is on disk
(``synchronous=FULL``) before the model answers: a crash or ``SIGKILL`` loses no answered query. A batch
that does not fit the remaining budget is refused whole and counts nothing.

Only a path where nothing exists starts a new ledger, made whole under a temporary name and then linked into
place, so a ledger file is never empty. A file that is not such a ledger (empty, not SQLite, damaged, no tables,
another schema or another program's tables, a count that is not a whole number >= 0) is refused when the ledger
is opened, before anything is served: starting over would forget every client's spent queries. A link is
followed first, so the ledger, its journal and its temporary file lie beside the file it points to; a link to
nothing is refused too.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

from edm_lightning.errors import ConfigError

__all__ = ["BudgetExhausted", "QueryLedger"]


class BudgetExhausted(Exception):
    """A batch would take a key past its budget; nothing was counted."""

    def __init__(self, client: str, spent: int, budget: int, requested: int):
        self.client, self.spent, self.budget, self.requested = client, spent, budget, requested
        super().__init__(f"query budget exhausted: {spent} of {budget} queries spent, this batch of {requested} would "
                         f"exceed it ({max(budget - spent, 0)} left); nothing was counted")


_COLUMNS = [("client", "TEXT", 0, 1), ("queries", "INTEGER", 1, 0)]  # name, type, not null, primary key
_COLUMNS_SQL = "client TEXT PRIMARY KEY, queries INTEGER NOT NULL"


def _ledger_problem(db: sqlite3.Connection) -> str | None:
    """What makes ``db`` something other than a query ledger, or ``None``."""
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if not tables:
        return "it holds no tables (an empty database)"
    if tables != ["spent"]:
        return f"it holds the tables {sorted(tables)}, not only a query ledger's 'spent'"
    columns = [(name, kind.upper(), notnull, pk) for _, name, kind, notnull, _, pk in db.execute("PRAGMA table_info(spent)")]
    if columns != _COLUMNS:
        return f"its table 'spent' has the columns {[c[0] + ' ' + c[1] for c in columns]}, not ({_COLUMNS_SQL})"
    check = db.execute("PRAGMA quick_check").fetchall()
    if check != [("ok",)]:
        return f"SQLite finds it damaged: {check[0][0]}"
    bad = db.execute("SELECT client, queries FROM spent WHERE typeof(client) != 'text' OR typeof(queries) != 'integer' "
                     "OR queries < 0 LIMIT 1").fetchone()
    if bad is not None:
        return f"client {bad[0]!r} has spent {bad[1]!r} queries, not a whole number >= 0"
    return None


class QueryLedger:
    """Per-client query counts in a SQLite file (created with its folder).

    Args:
        path: the database file; a restart with the same file continues every count.
        timeout_s: how long a charge waits for another writer's lock before failing.

    Raises:
        ConfigError: ``path`` cannot be opened or is not a query ledger (see the module's docstring).
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
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
            finally:
                db.close()
        except (sqlite3.Error, OSError, RuntimeError) as err:  # RuntimeError: a link loop (Python < 3.13)
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            raise ConfigError(f"the ledger {str(path)!r} is not a readable query ledger ({problem}): restore it from "
                              "a backup, or name another --ledger file (a new ledger forgets every client's spent queries)")

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
                db.execute(f"CREATE TABLE spent ({_COLUMNS_SQL})")
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

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)  # transactions by hand
        db.execute("PRAGMA synchronous=FULL")
        return db

    def spent(self, client: str) -> int:
        """Queries charged to ``client`` so far."""
        db = self._connect()
        try:
            row = db.execute("SELECT queries FROM spent WHERE client = ?", (client,)).fetchone()
        finally:
            db.close()
        return 0 if row is None else int(row[0])

    def charge(self, client: str, count: int, budget: int) -> int:
        """Count ``count`` queries for ``client`` if they fit ``budget``; committed when this returns.

        Returns:
            The client's queries spent, this batch included.

        Raises:
            BudgetExhausted: the batch does not fit; nothing was counted.
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT queries FROM spent WHERE client = ?", (client,)).fetchone()
            spent = 0 if row is None else int(row[0])
            if spent + count > budget:
                db.execute("ROLLBACK")
                raise BudgetExhausted(client, spent, budget, count)
            db.execute("INSERT INTO spent (client, queries) VALUES (?, ?) "
                       "ON CONFLICT(client) DO UPDATE SET queries = excluded.queries", (client, spent + count))
            db.execute("COMMIT")
            return spent + count
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def refund(self, client: str, count: int) -> None:
        """Give back ``count`` queries charged for a batch the server then failed to answer."""
        db = self._connect()
        try:
            db.execute("UPDATE spent SET queries = MAX(queries - ?, 0) WHERE client = ?", (count, client))
        finally:
            db.close()
