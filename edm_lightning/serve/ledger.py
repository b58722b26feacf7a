"""Queries counted per client in SQLite, committed before the answer leaves the server.

A client is counted under its name in the clients file (renaming a client starts a new count; giving an existing
name a new key keeps the count).

Each charge is one ``BEGIN IMMEDIATE`` transaction (the database's write lock), so concurrent requests,
threads and server processes sharing the file never spend past a budget together, and a count is on disk
(``synchronous=FULL``) before the model answers: a crash or ``SIGKILL`` loses no answered query. A batch
that does not fit the remaining budget is refused whole and counts nothing.

A file that is not such a ledger (not SQLite, damaged, another schema or another program's tables, a count
that is not a whole number >= 0) is refused when the ledger is opened, before anything is served.
"""

from __future__ import annotations

import sqlite3
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
    """What makes ``db`` something other than a query ledger (or an empty file, which becomes one), or ``None``."""
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if not tables:
        return None
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
        self.path = Path(path)
        self.timeout_s = timeout_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                problem = _ledger_problem(db)  # read only: a foreign file is not changed
                if problem is None:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(f"CREATE TABLE IF NOT EXISTS spent ({_COLUMNS_SQL})")
            finally:
                db.close()
        except (sqlite3.Error, OSError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            raise ConfigError(f"the ledger {str(self.path)!r} is not a readable query ledger ({problem}): restore it from "
                              "a backup, or name another --ledger file (a new ledger forgets every client's spent queries)")

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
