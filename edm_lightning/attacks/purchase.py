"""How every attack buys answers so that the victim answers at most the budget over all its runs, kills included.

An attack that keeps what it bought (KnockoffNets' transfer set, JBDA's rounds) holds it in one file, under a
:class:`Purchase`: a lock beside the file (one buyer at a time; another run waits, then reads what the first
bought instead of paying again) and a *pending record*, written before each oracle call and cleared once
the answers are saved. A run killed between the victim's answer and the save leaves the record; the next
run is charged its queries (the victim may have answered them) and keeps that charge in its file, so the
count errs towards the budget, never past it.

An attack that queries as it learns (DFME, MAZE) keeps nothing it could resume from; its oracle writes a
:class:`QueryLedger` instead: the queries charged over all runs, each batch charged before the victim sees it.
A re-run is charged what the killed runs spent and may spend only the rest of the budget; runs at the same time
share it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import Tensor

from edm_lightning.attacks.oracle import BlackBoxOracle, QueryBudgetExceeded
from edm_lightning.errors import ConfigError, unreadable_file_reason
from edm_lightning.files import save_atomic, write_atomic

__all__ = ["REFUSALS", "Purchase", "QueryLedger"]

#: What an oracle raises when it refused a batch before the victim answered any of it: the budget, or queries the
#: victim validates and refuses (a prediction API's own failures are ``RuntimeError``: it may have answered).
REFUSALS = (QueryBudgetExceeded, ValueError, TypeError)


class Purchase:
    """The guards around one file of bought answers: its lock and its pending record (see the module docstring).

    Use as a context manager: entering takes the lock (and removes what a save killed half-way left), leaving
    releases it. Inside, :meth:`take_pending` says what a killed run may have been answered, and :meth:`ask`
    queries the oracle with the record written first; :meth:`settle` clears it once the answers are saved;
    :meth:`complete` buys what a set of queries still lacks that way, a batch at a time.

    Args:
        path: the file the attack keeps its answers in (the lock and the record go beside it).

    Example:
        >>> import tempfile
        >>> from edm_lightning.attacks.oracle import BlackBoxOracle, QueryBudgetExceeded
        >>> class Victim:
        ...     input_shape, num_classes = (1, 2, 2), 3
        ...     def __call__(self, x):
        ...         return torch.full((len(x), 3), 1 / 3)
        >>> oracle = BlackBoxOracle(Victim(), budget=8)
        >>> with tempfile.TemporaryDirectory() as folder, Purchase(Path(folder) / "set.pt") as purchase:
        ...     answers = purchase.ask(oracle, torch.zeros(4, 1, 2, 2), items=0, queries=4)
        ...     # a kill here (the answers not yet saved) would leave the record: the next run pays for it
        ...     left = purchase.take_pending()
        ...     purchase.settle()
        ...     after = purchase.take_pending()
        >>> tuple(answers.shape), left, after
        ((4, 3), {'items': 0, 'queries': 4}, None)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pending_path = self.path.with_name(self.path.name + ".pending")
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"))

    def __enter__(self) -> Purchase:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a save killed half-way (we hold the lock)
            stale.unlink()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def take_pending(self) -> dict[str, int] | None:
        """The record a killed run left (``items`` bought before the call, ``queries`` it asked), or ``None``.

        The caller charges ``queries`` and records the charge in its own file, then calls :meth:`settle`.

        Returns:
            The record, or ``None`` when no run was killed in a call.

        Raises:
            ConfigError: the record is unreadable or holds negative counts (it is not one this package wrote).
        """
        if not self.pending_path.is_file():
            return None
        try:
            record = torch.load(self.pending_path, map_location="cpu", weights_only=True)
            record = {"items": int(record["items"]), "queries": int(record["queries"])}
        except Exception as err:
            raise ConfigError(f"{str(self.pending_path)!r} is not a pending-query record ({unreadable_file_reason(err)}): "
                              "delete the attack's cache to buy its answers afresh") from None
        if min(record.values()) < 0:
            raise ConfigError(f"{str(self.pending_path)!r} records negative counts {record}: delete the attack's cache to "
                              "buy its answers afresh")
        return record

    def ask(self, oracle: BlackBoxOracle | Any, x: Tensor, items: int, queries: int | None = None) -> Tensor:
        """The oracle's answers to ``x`` ``(n, C, H, W)``, with the pending record written before the victim sees them.

        Args:
            oracle: the attack's oracle.
            x: the queries.
            items: what the file holds before these answers (where a killed run stopped).
            queries: what the call costs (default ``len(x)``).

        Returns:
            The answers ``(n, K)``. The record stays until :meth:`settle`: save the answers first.

        Raises:
            Exception: whatever the oracle raises. A refusal (:data:`REFUSALS`: the budget, or queries the victim
                refused before answering) clears the record first; anything else (an interrupt, a prediction API that
                failed after the server may have answered and charged) keeps it: the victim may have answered.
        """
        save_atomic({"items": int(items), "queries": int(len(x) if queries is None else queries)}, self.pending_path)
        try:
            return oracle(x)
        except REFUSALS:  # refused before the victim saw the batch: nothing to charge
            self.settle()
            raise

    def settle(self) -> None:
        """Clear the pending record: the answers of the last :meth:`ask` are saved (or were charged)."""
        self.pending_path.unlink(missing_ok=True)

    def complete(self, oracle: Callable[[], BlackBoxOracle], x: Tensor, answers: Tensor, batch_size: int,
                 save: Callable[[Tensor], None]) -> Tensor:
        """The answers to every row of ``x`` ``(n, C, H, W)``: ``answers`` holds the first ones (bought earlier), the
        rest are asked ``batch_size`` rows per call, each call's answers saved (``save(all answers so far)``) before
        its record is cleared.

        Args:
            oracle: gives the attack's oracle; called only when something is left to buy.
            x: the queries.
            answers: answers to the first rows of ``x`` already held.
            batch_size: rows per oracle call.
            save: writes the answers so far where the next run reads them.

        Returns:
            Answers ``(n, K)`` to every row.
        """
        while len(answers) < len(x):
            batch = x[len(answers): len(answers) + batch_size]
            answers = torch.cat([answers, self.ask(oracle(), batch, items=len(answers))])
            save(answers)
            self.settle()
        return answers


class QueryLedger:
    """The queries an attack charged over all its runs, in a small JSON file, for attacks that query as they learn.

    :class:`~edm_lightning.attacks.oracle.BlackBoxOracle` charges it before the victim sees a batch
    (:meth:`reserve`, refused when the budget is spent, by this run or any other) and refunds a batch the victim
    refused (:meth:`refund`); a run killed in between leaves the batch charged. Each change is a read-modify-write
    under a file lock, so runs of one attack at the same time share one budget.

    Args:
        path: the ledger's file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"))

    @property
    def spent(self) -> int:
        """Queries the victim may have answered in every run so far (batches in flight included).

        Raises:
            ConfigError: the file is not a ledger this package wrote (unreadable, or a negative count).
        """
        if not self.path.is_file():
            return 0
        try:
            spent = int(json.loads(self.path.read_text())["spent"])
        except Exception as err:
            raise ConfigError(f"{str(self.path)!r} is not a query ledger ({unreadable_file_reason(err)}): it records what "
                              "earlier runs of this attack spent; delete it only to start the attack over") from None
        if spent < 0:
            raise ConfigError(f"{str(self.path)!r} records a negative count ({spent}): it was not written by this package; "
                              "delete it only to start the attack over")
        return spent

    def reserve(self, count: int, budget: int | None) -> None:
        """Charge ``count`` queries before the victim sees them.

        Raises:
            QueryBudgetExceeded: they would take the attack past ``budget`` over all its runs; nothing is charged.
        """
        with self._lock:
            spent = self.spent
            if budget is not None and spent + count > budget:
                raise QueryBudgetExceeded(spent, budget, count)
            self._write(spent + count)

    def refund(self, count: int) -> None:
        """Take back ``count`` queries the victim refused before answering any."""
        with self._lock:
            self._write(max(0, self.spent - count))

    def _write(self, spent: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"spent": int(spent)}))
