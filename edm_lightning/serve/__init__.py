"""The prediction API (``python -m edm_lightning.serve``): the victim behind HTTP, per-client keys and budgets.

The server itself (:mod:`edm_lightning.serve.app`) needs the ``[serve]`` extra; the clients file and the SQLite
ledger do not (the PostgreSQL ledger needs ``psycopg``, in the same extra).
"""

from edm_lightning.serve.clients import Client, add_client, key_digest, load_clients
from edm_lightning.serve.ledger import Bucket, BudgetExhausted, Ledger, LedgerUnavailable, SqliteLedger, open_ledger

__all__ = ["BudgetExhausted", "Bucket", "Client", "Ledger", "LedgerUnavailable", "SqliteLedger", "add_client",
           "key_digest", "load_clients", "open_ledger"]
