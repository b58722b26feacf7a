"""The black-box oracle: the one door between an attacker and a victim.

Model-stealing threat models (Tramer et al. 2016; Orekondy et al. 2019) give the attacker a
prediction API and nothing else: inputs in, answers out, each answer paid for. The oracle is that
API. It answers with probability vectors (or top-1 labels), counts every query row against a budget
and refuses to go past it *before* the victim sees the batch, so no code path can spend more than
was allowed. Answers are detached copies, and the oracle is not an ``nn.Module`` (no ``parameters()``,
no ``state_dict()``).

What it protects against, and what not: it keeps *honest* attack code to the threat model (every
attack in this package reaches the victim only through it, and the budget holds). It is not a security
boundary: code in the same process can reach the victim through the closure that holds it, or through
the DataModule that built it. A real attacker sits behind a network API, where only the answers cross;
that is where a deployed model's secrets (weights, router key) are out of reach.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from edm_lightning.errors import ConfigError

__all__ = ["BlackBoxOracle", "Ledger", "QueryBudgetExceeded", "Servable", "check_budget_covers_batch"]


class Servable(Protocol):
    """What the oracle needs of a victim (:class:`~edm_lightning.defense.Victim` is one): a callable
    from images ``(N, *input_shape)`` in [0, 1] to probabilities ``(N, num_classes)`` that validates its inputs.
    """

    input_shape: tuple[int, int, int]
    num_classes: int

    def __call__(self, x: Tensor) -> Tensor:
        """Probabilities ``(N, num_classes)`` for images ``x`` ``(N, *input_shape)``."""
        ...


def check_budget_covers_batch(budget: int, batch_size: int, where: str = "") -> None:
    """Refuse a budget smaller than one query batch: the attack could not make a single query.

    Raises:
        ConfigError: ``budget < batch_size`` (the message names ``where`` and both remedies).
    """
    if budget < batch_size:
        raise ConfigError(
            f"{where}budget={budget} is smaller than one query batch (batch_size={batch_size}): the attack could not "
            "make a single query. Raise the budget or lower batch_size."
        )


class Ledger(Protocol):
    """Where an oracle charges its calls for every run of the attack (:class:`~edm_lightning.attacks.purchase.QueryLedger`)."""

    def reserve(self, count: int, budget: int | None) -> None:
        """Charge ``count`` queries before the victim sees them; raise :class:`QueryBudgetExceeded` past ``budget``."""
        ...

    def refund(self, count: int) -> None:
        """Take back ``count`` queries the victim refused before answering."""
        ...


class QueryBudgetExceeded(RuntimeError):
    """A batch would take the oracle past its query budget; nothing was answered or counted."""

    def __init__(self, spent: int, allowed: int, requested: int):
        self.spent, self.allowed, self.requested = spent, allowed, requested
        super().__init__(
            f"query budget exceeded: {spent} of {allowed} queries spent, a batch of {requested} more was refused "
            f"({allowed - spent} left). Raise the attack's budget or query fewer inputs."
        )


class BlackBoxOracle:
    """A victim behind a prediction API that counts queries (one query = one input row).

    Args:
        victim: what to serve (a :class:`~edm_lightning.defense.Victim`, or any :class:`Servable`); it must expose
            ``input_shape`` and ``num_classes`` and validate its inputs.
        budget: most queries ever answered (``None``: unlimited, for evaluation harnesses only).
        label_only: answer with the top-1 label only, as a one-hot float vector. One-hot (not an index)
            keeps every answer the same shape, so transfer sets, caches and the clone's soft-label loss
            handle both answer kinds alike.
        spent: queries already spent in an earlier run of the same attack (a resume); they count
            against ``budget``.
        ledger: where every call is charged for all runs of the attack (a
            :class:`~edm_lightning.attacks.purchase.QueryLedger`: ``reserve(count, budget)`` before the victim sees a
            batch, refused once the runs together spent the budget; ``refund(count)`` when the victim refused it), or
            ``None``.
    """

    def __init__(self, victim: Servable, budget: int | None, label_only: bool = False, spent: int = 0,
                 ledger: Ledger | None = None):
        for attribute in ("input_shape", "num_classes"):
            if not hasattr(victim, attribute):
                raise TypeError(f"the victim must expose {attribute!r} (a Victim does); got {type(victim).__name__}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ConfigError(f"budget must be a positive whole number of queries (or None for unlimited), got {budget!r}")
        if isinstance(spent, bool) or not isinstance(spent, int) or spent < 0 or (budget is not None and spent > budget):
            raise ConfigError(f"spent must be a whole number in [0, budget={budget}], got {spent!r}")
        self.input_shape: tuple[int, int, int] = tuple(int(v) for v in victim.input_shape)
        self.num_classes: int = int(victim.num_classes)
        self.budget = budget
        self.label_only = bool(label_only)
        self._spent = int(spent)
        self.resumed_from = int(spent)  # so a run can report what *it* spent
        self._ledger = ledger
        self._answer: Callable[[Tensor], Tensor] = _sealed(victim)

    @property
    def queries_spent(self) -> int:
        """Queries answered so far (including those of earlier runs passed as ``spent``)."""
        return self._spent

    @property
    def ledger(self) -> Ledger | None:
        """Where the oracle charges its calls for every run of the attack (``None``: nowhere)."""
        return self._ledger

    @property
    def remaining(self) -> int | None:
        """Queries left (``None``: unlimited)."""
        return None if self.budget is None else self.budget - self._spent

    def charge(self, queries: int) -> None:
        """Count ``queries`` the victim answered outside this oracle (a killed run's batch found later), up to the budget.

        Raises:
            ValueError: ``queries`` is negative.
        """
        if queries < 0:
            raise ValueError(f"cannot charge a negative number of queries ({queries})")
        self._spent = self._spent + queries if self.budget is None else min(self.budget, self._spent + queries)

    def __call__(self, x: Tensor) -> Tensor:
        """Answers ``(N, num_classes)`` for images ``x`` ``(N, C, H, W)`` in [0, 1]; counts N queries.

        Returns:
            Probabilities (or one-hot top-1 labels) ``(N, num_classes)``, detached, on ``x``'s device.

        Raises:
            ValueError: ``x`` is not a tensor (a numpy array, a list, ``None``), or the victim refused it.
            QueryBudgetExceeded: the batch would take the oracle past its budget (or, with a ledger, the attack's runs
                together past it); nothing was answered.
            TypeError: the victim refused the queries' type; nothing was answered.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"queries must be a torch.Tensor of images (N, {', '.join(map(str, self.input_shape))}), got "
                             f"{type(x).__name__}; convert with torch.as_tensor(x, dtype=torch.float32)")
        if x.device.type == "meta":
            raise ValueError("queries must hold data: got a tensor on the meta device")
        count = int(x.shape[0]) if x.ndim >= 1 else 0
        if self.budget is not None and self._spent + count > self.budget:
            raise QueryBudgetExceeded(self._spent, self.budget, count)
        if self._ledger is not None:
            self._ledger.reserve(count, self.budget)  # a kill from here on is charged the batch
        try:
            answers = self._answer(x)  # the victim validates shape, dtype and range before answering
        except (ValueError, TypeError):  # the victim refused the queries before answering: nothing was answered
            if self._ledger is not None:  # (an interrupt, or an API failure after the server answered, stays charged)
                self._ledger.refund(count)
            raise
        self._spent += count
        if self.label_only:
            answers = nn.functional.one_hot(answers.argmax(dim=-1), self.num_classes).to(answers.dtype)
        return answers

    def __repr__(self) -> str:
        return (
            f"BlackBoxOracle(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"spent={self._spent}, budget={self.budget}, label_only={self.label_only})"
        )


def _sealed(victim: Servable) -> Callable[[Tensor], Tensor]:
    """A function answering queries with detached copies; the victim lives only in its closure.

    Queries go to the victim's device and answers come back on the caller's, so a clone on a GPU can
    query a victim served on the CPU (or the other way round).

    Returns:
        ``x -> answers``, holding the victim in its closure.
    """
    if isinstance(victim, nn.Module):
        victim = victim.eval()
    parameters = victim.parameters() if isinstance(victim, nn.Module) else ()
    device = next((p.device for p in parameters), torch.device("cpu"))  # a remote victim takes CPU tensors

    def answer(x: Tensor) -> Tensor:
        with torch.no_grad():
            return victim(x.detach().to(device)).detach().to(x.device).clone()

    return answer
