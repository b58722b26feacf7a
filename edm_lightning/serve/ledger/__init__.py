"""Queries counted per client, committed before the answer leaves the server, and rate limits shared by replicas.

A path names a SQLite file (:class:`SqliteLedger`: one host, any number of processes); a ``postgresql://`` URL a
PostgreSQL database (:class:`PostgresLedger`: any number of replicas on any hosts). Both keep the same promise:
a batch is charged in one transaction, committed before it is answered, refused whole if it does not fit.
"""

from __future__ import annotations

import argparse
import sys

from edm_lightning.errors import exit_if_user_error
from edm_lightning.serve.ledger.base import Bucket, BudgetExhausted, Ledger, LedgerUnavailable
from edm_lightning.serve.ledger.postgres import PostgresLedger, create_schema, is_postgres_url, mask_password
from edm_lightning.serve.ledger.sqlite import SqliteLedger

__all__ = ["BudgetExhausted", "Bucket", "Ledger", "LedgerUnavailable", "PostgresLedger", "SqliteLedger",
           "init_ledger", "init_ledger_main", "mask_password", "open_ledger"]


def open_ledger(spec: str) -> Ledger:
    """The ledger ``spec`` names: a ``postgresql://`` (or ``postgres://``) URL, else a SQLite file's path.

    Returns:
        The opened ledger, checked (reachable, its schema ours).

    Raises:
        ConfigError: it cannot be reached, the credentials are refused, its schema is missing or foreign (one
            line; a password in the URL masked).
    """
    return PostgresLedger(spec) if is_postgres_url(spec) else SqliteLedger(spec)


def init_ledger(spec: str) -> Ledger:
    """Create the ledger ``spec`` names if it is missing (PostgreSQL: its tables; SQLite: its file), and open it.

    Returns:
        The opened ledger.

    Raises:
        ConfigError: as :func:`open_ledger`, and for tables that cannot be created.
    """
    if is_postgres_url(spec):
        create_schema(spec)
    return open_ledger(spec)


def init_ledger_main(argv: list[str], prog: str = "python -m edm_lightning.serve init-ledger") -> None:
    """``init-ledger --ledger URL_OR_PATH``: create the ledger's tables once, before the first server starts."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=(
        "Create the query ledger's tables (idempotent). A PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE; the "
        "password in PGPASSWORD or ~/.pgpass) lets several server replicas share budgets and rate limits; a file "
        "path makes a SQLite ledger (one host)."))
    parser.add_argument("--ledger", required=True, help="postgresql:// URL, or a SQLite file path")
    args = parser.parse_args(argv)
    try:
        ledger = init_ledger(args.ledger)
    except Exception as err:
        exit_if_user_error(err)
        raise
    print(f"the ledger {ledger.describe()} is ready: start every server with --ledger naming it", file=sys.stderr)
    ledger.close()
