"""Queries counted per client in SQLite, committed before the answer leaves the server.

A client is counted under its name in the clients file (renaming a client starts a new count; giving an existing
name a new key keeps the count).

Each charge is one ``BEGIN IMMEDIATE`` transaction (the database's write lock), so concurrent requests,
threads and server processes sharing the file never spend past a budget together, and a count is on disk
(``synchronous=FULL``) before the model answers: a crash or ``SIGKILL`` loses no answered query. A batch
that does not fit the remaining budget is refused whole and counts nothing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["BudgetExhausted", "QueryLedger"]


class BudgetExhausted(Exception):
    """A batch would take a key past its budget; nothing was counted."""

    def __init__(self, client: str, spent: int, budget: int, requested: int):
        self.client, self.spent, self.budget, self.requested = client, spent, budget, requested
        super().__init__(f"query budget exhausted: {spent} of {budget} queries spent, this batch of {requested} would "
                         f"exceed it ({max(budget - spent, 0)} left); nothing was counted")


class QueryLedger:
    """Per-client query counts in a SQLite file (created with its folder).

    Args:
        path: the database file; a restart with the same file continues every count.
        timeout_s: how long a charge waits for another writer's lock before failing.
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS spent (client TEXT PRIMARY KEY, queries INTEGER NOT NULL)")
        finally:
            db.close()

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
