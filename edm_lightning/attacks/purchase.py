"""How every attack buys answers so that the victim answers at most the budget over all its runs, kills included.

An attack that keeps what it bought (KnockoffNets' transfer set, JBDA's rounds) holds it in one file, under a
:class:`Purchase`: a lock beside the file (one buyer at a time; another run waits, then reads what the first
bought instead of paying again) and a *pending record*, written before each oracle call and cleared once
the answers are saved. A run killed between the victim's answer and the save leaves the record; the next
run is charged its queries (the victim may have answered them) and keeps that charge in its file, so the
count errs towards the budget, never past it. A victim that fails part-way through a call (a prediction API that
answered the first requests of a split batch, then refused one) is not forgotten either: the answers that arrived
are saved, and only what it may have answered besides stays charged as pending. Only a refusal before the victim
saw the batch clears the record; answers the victim sent but the oracle refused (NaN, a row too many) stay charged.

Every record read back (pending records, the ledger, and each attack's own files) is checked like input from
outside: a count that is not a whole non-negative number is refused with the file's name, never trusted.

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

from edm_lightning.attacks.oracle import BlackBoxOracle, PartlyAnswered, QueryBudgetExceeded
from edm_lightning.errors import ConfigError, unreadable_file_reason
from edm_lightning.files import save_atomic, write_atomic

__all__ = ["DAMAGED", "REFUSALS", "Purchase", "QueryLedger", "count_problem", "load_record"]

#: What an oracle raises when it refused a batch before the victim answered any of it: the budget, or queries the
#: victim validates and refuses (a prediction API's own failures are ``RuntimeError``: it may have answered).
REFUSALS = (QueryBudgetExceeded, ValueError, TypeError)

#: What to do about a damaged record of what an attack bought (the end of every message refusing one).
DAMAGED = ("it records what earlier runs of this attack bought and were charged: delete it only to start the attack over "
           "(the victim is then asked again, and what it answered before counts nowhere)")


def load_record(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """The mapping an attack saved in ``path`` (a ``what``: a transfer set, a round), read without running any code.

    Returns:
        The mapping; it holds ``keys`` (their values are the caller's to check).

    Raises:
        ConfigError: the file is unreadable (truncated, a pickle of anything else), not a mapping, or lacks one of
            ``keys``; the message names it.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{str(path)!r} is not a readable {what} ({unreadable_file_reason(err)}); {DAMAGED}") from None
    missing = [key for key in keys if key not in blob] if isinstance(blob, dict) else list(keys)
    if missing:
        held = "no " + ", ".join(map(repr, missing)) if isinstance(blob, dict) else f"a {type(blob).__name__}"
        raise ConfigError(f"{str(path)!r} is not a readable {what} ({held}); {DAMAGED}")
    return blob


def count_problem(record: object, keys: tuple[str, ...]) -> str | None:
    """What is wrong with ``record`` as a mapping of ``keys`` to whole non-negative counts (read back from a file).

    Returns:
        ``None`` when it is one, else one line saying what is wrong.
    """
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a mapping of {', '.join(keys)}"
    missing = [key for key in keys if key not in record]
    if missing:
        return f"no {', '.join(map(repr, missing))}"
    bad = {key: record[key] for key in keys
           if isinstance(record[key], bool) or not isinstance(record[key], int) or record[key] < 0}
    if bad:
        return f"{', '.join(f'{key}={value!r}' for key, value in bad.items())}: expected whole non-negative counts"
    return None


class Purchase:
    """The guards around one file of bought answers: its lock and its pending record (see the module docstring).

    Use as a context manager: entering takes the lock (and removes what a save killed half-way left), leaving
    releases it. Inside, :meth:`take_pending` says what a killed run may have been answered, and :meth:`buy`
    queries the oracle with the record written first and clears it once the answers are saved (keeping what a
    victim that failed part-way answered); :meth:`complete` buys what a set of queries still lacks that way, a batch
    at a time.

    Args:
        path: the file the attack keeps its answers in (the lock and the record go beside it).

    Example:
        >>> import tempfile
        >>> from edm_lightning.attacks.oracle import BlackBoxOracle
        >>> class Victim:
        ...     input_shape, num_classes = (1, 2, 2), 3
        ...     def __call__(self, x):
        ...         return torch.full((len(x), 3), 1 / 3)
        >>> oracle = BlackBoxOracle(Victim(), budget=8)
        >>> kept, pending = [], []
        >>> def keep(answers):  # save the answers where the next run reads them
        ...     kept.append(answers)
        ...     pending.append(purchase.take_pending())  # a kill here would leave the record: the next run pays for it
        >>> with tempfile.TemporaryDirectory() as folder, Purchase(Path(folder) / "set.pt") as purchase:
        ...     purchase.buy(oracle, torch.zeros(4, 1, 2, 2), items=0, keep=keep)
        ...     after = purchase.take_pending()
        >>> tuple(kept[0].shape), pending, after
        ((4, 3), [{'items': 0, 'queries': 4}], None)
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
            ConfigError: the record is unreadable, or not two whole non-negative counts (it is not one this package
                wrote); it is left as it was.
        """
        if not self.pending_path.is_file():
            return None
        try:
            record = torch.load(self.pending_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"{str(self.pending_path)!r} is not a pending-query record ({unreadable_file_reason(err)}): "
                              f"{DAMAGED}") from None
        problem = count_problem(record, ("items", "queries"))
        if problem is not None:
            raise ConfigError(f"{str(self.pending_path)!r} is not a pending-query record ({problem}): {DAMAGED}")
        return {"items": record["items"], "queries": record["queries"]}

    def buy(self, oracle: BlackBoxOracle | Any, x: Tensor, items: int, keep: Callable[[Tensor], None],
            rows_per_item: int = 1) -> None:
        """Ask the oracle for ``x`` ``(n, C, H, W)``, with the pending record written first; ``keep(answers)`` saves the
        answers where the next run reads them, then the record is cleared.

        Args:
            oracle: the attack's oracle.
            x: the queries, ``rows_per_item`` consecutive rows per item the file keeps (copies of one image).
            items: what the file holds before these answers (where a killed run stopped).
            keep: saves answers ``(k * rows_per_item, K)`` to the first ``k`` items of ``x``.
            rows_per_item: query rows per kept item.

        Raises:
            PartlyAnswered: the victim answered part of the batch (or answers that were refused): the whole items it
                answered are kept first, and the record is left holding only what it may have answered besides
                (cleared when that is nothing).
            Exception: whatever else the oracle raises. A refusal (:data:`REFUSALS`: the budget, or queries the victim
                refused before answering) clears the record first; anything else (an interrupt, a failure after the
                victim may have answered) keeps it: the next run is charged the batch.
        """
        self._record(items, len(x))
        try:
            answers = oracle(x)
        except REFUSALS:  # refused before the victim saw the batch: nothing to charge
            self.settle()
            raise
        except PartlyAnswered as err:  # keep what arrived; what may have been answered besides stays charged
            whole = len(err.answers) // rows_per_item
            if whole:
                keep(err.answers[: whole * rows_per_item])
            left = err.charged - whole * rows_per_item
            if left > 0:
                self._record(items + whole, left)
            else:
                self.settle()
            raise
        keep(answers)
        self.settle()

    def settle(self) -> None:
        """Clear the pending record: the answers of the last :meth:`buy` are saved (or were charged)."""
        self.pending_path.unlink(missing_ok=True)

    def complete(self, oracle: Callable[[], BlackBoxOracle], x: Tensor, answers: Tensor, batch_size: int,
                 save: Callable[[Tensor], None]) -> Tensor:
        """The answers to every row of ``x`` ``(n, C, H, W)``: ``answers`` holds the first ones (bought earlier), the
        rest are bought ``batch_size`` rows per call (:meth:`buy`), each call's answers saved (``save(all answers so
        far)``) before its record is cleared.

        Args:
            oracle: gives the attack's oracle; called only when something is left to buy.
            x: the queries.
            answers: answers to the first rows of ``x`` already held.
            batch_size: rows per oracle call.
            save: writes the answers so far where the next run reads them.

        Returns:
            Answers ``(n, K)`` to every row.
        """
        held = [answers]

        def keep(bought: Tensor) -> None:
            held.append(bought.to(answers.dtype))
            save(torch.cat(held))

        while (done := sum(len(part) for part in held)) < len(x):
            self.buy(oracle(), x[done: done + batch_size], items=done, keep=keep)
        return torch.cat(held)

    def _record(self, items: int, queries: int) -> None:
        save_atomic({"items": int(items), "queries": int(queries)}, self.pending_path)


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
            record = json.loads(self.path.read_text())
        except Exception as err:
            raise ConfigError(f"{str(self.path)!r} is not a query ledger ({unreadable_file_reason(err)}): it records what "
                              "earlier runs of this attack spent; delete it only to start the attack over") from None
        problem = count_problem(record, ("spent",))
        if problem is not None:
            raise ConfigError(f"{str(self.path)!r} is not a query ledger this package wrote ({problem}): it records what "
                              "earlier runs of this attack spent; delete it only to start the attack over")
        return record["spent"]

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
