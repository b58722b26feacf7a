"""The prediction API (``python -m edm_lightning.serve``): the victim behind HTTP, per-client keys and budgets.

The server itself (:mod:`edm_lightning.serve.app`) needs the ``[serve]`` extra; the ledger and the clients
file do not.
"""

from edm_lightning.serve.clients import Client, add_client, key_digest, load_clients
from edm_lightning.serve.ledger import BudgetExhausted, QueryLedger

__all__ = ["BudgetExhausted", "Client", "QueryLedger", "add_client", "key_digest", "load_clients"]
