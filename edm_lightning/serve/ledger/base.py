"""What every query ledger offers the server: budgets charged and refunded, and rate-limit buckets admitted.

The server relies only on :class:`Ledger`; :func:`~edm_lightning.serve.ledger.open_ledger` picks the backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BudgetExhausted", "Bucket", "Ledger", "LedgerUnavailable", "check_buckets", "gcra"]


class BudgetExhausted(Exception):
    """A batch would take a key past its budget; nothing was counted."""

    def __init__(self, client: str, spent: int, budget: int, requested: int):
        self.client, self.spent, self.budget, self.requested = client, spent, budget, requested
        super().__init__(f"query budget exhausted: {spent} of {budget} queries spent, this batch of {requested} would "
                         f"exceed it ({max(budget - spent, 0)} left); nothing was counted")


class LedgerUnavailable(Exception):
    """The ledger's database cannot be reached or used right now; nothing was counted or consumed.

    The server answers 503 (try again later) and nothing else: a request is never answered uncounted.
    """


@dataclass(frozen=True)
class Bucket:
    """A rate limit as a GCRA (a token bucket without a refill timer).

    Args:
        name: the bucket's key in the ledger, shared by every process using it (e.g. ``"client:alice:images"``).
        cost: units this request takes (1 for a request, its rows for images).
        rate: units refilled per second (> 0).
        burst: most units at once (> 0); a full bucket admits ``burst`` units together.

    Raises:
        ValueError: ``rate`` or ``burst`` is not a finite number > 0, or ``cost`` is negative.
    """

    name: str
    cost: float
    rate: float
    burst: float

    def __post_init__(self):
        if not (math.isfinite(self.rate) and self.rate > 0 and math.isfinite(self.burst) and self.burst > 0):
            raise ValueError(f"bucket {self.name!r}: rate and burst must be finite numbers > 0, got {self.rate} and "
                             f"{self.burst}")
        if not (math.isfinite(self.cost) and self.cost >= 0):
            raise ValueError(f"bucket {self.name!r}: cost must be a finite number >= 0, got {self.cost}")


def check_buckets(buckets: Sequence[Bucket]) -> None:
    """Refuse buckets no request could ever pass, before any state is touched.

    Raises:
        ValueError: a cost above its bucket's burst (it could never fit), or a bucket named twice.
    """
    if len({bucket.name for bucket in buckets}) != len(buckets):
        raise ValueError(f"a bucket is named twice in {[bucket.name for bucket in buckets]}")
    for bucket in buckets:
        if bucket.cost > bucket.burst:
            raise ValueError(f"bucket {bucket.name!r}: a cost of {bucket.cost} can never fit its burst of {bucket.burst}")


def gcra(buckets: Sequence[Bucket], tats: dict[str, float], now: float) -> tuple[float, dict[str, float]]:
    """One admission decision over ``buckets`` at ``now`` (seconds), from each bucket's stored theoretical arrival
    time (``tats``; a bucket missing from it is full).

    A bucket of rate r and burst b admits a cost c when ``max(tat, now) + c/r - b/r <= now``; it then stores
    ``max(tat, now) + c/r``. All buckets are admitted together or none is.

    Returns:
        ``(0.0, new tats)`` when every bucket admits the request; else ``(seconds until it would fit, {})``.

    Raises:
        ValueError: a cost above its bucket's burst (it could never fit), or a bucket named twice.
    """
    check_buckets(buckets)
    wait, new = 0.0, {}
    for bucket in buckets:
        tat = max(tats.get(bucket.name, now), now)
        new[bucket.name] = tat + bucket.cost / bucket.rate
        wait = max(wait, new[bucket.name] - bucket.burst / bucket.rate - now)
    return (wait, {}) if wait > 0 else (0.0, new)


class Ledger(Protocol):
    """Per-client query counts and rate-limit state, shared by every server process using the same ledger.

    Every method raises :class:`LedgerUnavailable` when the database cannot be used right now.
    """

    def spent(self, client: str) -> int:
        """Queries charged to ``client`` so far."""

    def spent_by_client(self) -> dict[str, int]:
        """Queries charged so far, by client name (clients never charged are absent)."""

    def charge(self, client: str, count: int, budget: int) -> int:
        """Count ``count`` queries for ``client`` if they fit ``budget``, committed before this returns; a batch
        that does not fit is refused whole.

        Returns:
            The client's queries spent, this batch included.

        Raises:
            BudgetExhausted: the batch does not fit; nothing was counted.
            LedgerUnavailable: the database cannot be used; nothing was counted.
            ValueError: ``count`` is negative.
        """

    def refund(self, client: str, count: int) -> None:
        """Give back ``count`` queries charged for a batch the server then failed to answer."""

    def admit(self, buckets: Sequence[Bucket]) -> float:
        """Take every bucket's cost at once, or none (see :func:`gcra`).

        Returns:
            0.0 when admitted (every bucket consumed); else the seconds until the request would fit, nothing consumed.

        Raises:
            LedgerUnavailable: the database cannot be used; nothing was consumed.
            ValueError: a cost above its bucket's burst.
        """

    def describe(self) -> str:
        """A printable name of the ledger (a database URL with its password masked)."""

    def close(self) -> None:
        """Release connections; the ledger is not used afterwards."""
