"""The black-box oracle: the one door between an attacker and a victim.

Model-stealing threat models (Tramer et al. 2016; Orekondy et al. 2019) give the attacker a
prediction API and nothing else: inputs in, answers out, each answer paid for. The oracle is that
API. It answers with probability vectors (or top-1 labels), counts every query row against a budget
and refuses to go past it *before* the victim sees the batch, so no code path can spend more than
was allowed. Answers are detached copies, and the oracle is not an ``nn.Module`` (no ``parameters()``,
no ``state_dict()``).

Every answer is checked before anyone keeps it (:func:`answer_problem`: a tensor of one probability vector per query,
finite, non-negative, summing to 1): a victim that answers NaN, or one row too many, is refused with its name, and
the refused batch is charged all the same (the victim did answer it). A victim that fails part-way through a batch
(a prediction API that splits it into requests) raises :class:`PartlyAnswered` with the answers that did arrive,
so whoever buys keeps them, and the oracle charges exactly what the victim may have answered.

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

from edm_lightning.errors import ConfigError, UserError

__all__ = ["SUM_TOLERANCE", "BadAnswers", "BlackBoxOracle", "Ledger", "PartlyAnswered", "QueryBudgetExceeded", "Servable",
           "answer_problem", "check_budget_covers_batch", "victim_name"]

#: How far a probability vector may sum from 1 (or dip below 0): float32 rounding stays orders of magnitude below.
SUM_TOLERANCE = 1e-3


class Servable(Protocol):
    """What the oracle needs of a victim (:class:`~edm_lightning.defense.Victim` is one): a callable
    from images ``(N, *input_shape)`` in [0, 1] to probabilities ``(N, num_classes)`` that validates its inputs.

    It raises ``ValueError`` or ``TypeError`` only for queries it refused before answering any of them, and
    :class:`PartlyAnswered` when it failed after answering some (or after it may have).
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


class PartlyAnswered(UserError, RuntimeError):
    """The victim failed after it answered some rows of a batch, or may have: what it answered is charged, never forgotten.

    A user error: its message names the victim and what went wrong (a key out of budget, a server failure, unusable
    answers), and the CLIs end with it in one line (exit status 2), not a traceback.

    A victim raises it with its answers to the batch's first rows (a prediction API that answered the first requests
    of a split batch); the oracle charges them and :attr:`unsure` and raises it on, with the answers checked, to the
    attack, which keeps them (:meth:`~edm_lightning.attacks.purchase.Purchase.buy`) so a re-run does not buy them again.

    Attributes:
        answers: answers ``(k, num_classes)`` to the batch's first ``k`` rows (``k`` may be 0).
        unsure: rows after those the victim may have answered without the answers reaching us (a lost reply, an
            answer that could not be read): charged, since they may have been.
    """

    def __init__(self, message: str, answers: Tensor | None = None, unsure: int = 0):
        super().__init__(message)
        self.answers = answers if answers is not None else torch.empty(0, 0)
        self.unsure = int(unsure)

    @property
    def charged(self) -> int:
        """Rows the victim may have answered: the answers that arrived and the :attr:`unsure` ones."""
        return len(self.answers) + self.unsure


class BadAnswers(PartlyAnswered):
    """The victim answered, but not with answers anyone may keep (NaN, a row too many, a class that does not exist).

    Nothing of the batch is kept; it is charged all the same (:attr:`unsure` is the whole batch): the victim answered.
    """

    def __init__(self, message: str, rows: int):
        super().__init__(message, None, rows)


def answer_problem(answers: object, rows: int, num_classes: int) -> str | None:
    """What is wrong with ``answers`` as the probability vectors of ``rows`` queries over ``num_classes`` classes.

    Checked: a floating-point tensor of shape ``(rows, num_classes)``, every value finite and non-negative, every row
    summing to 1 (within :data:`SUM_TOLERANCE`). One-hot labels pass. The oracle checks every answer with it before
    anyone keeps one; an attack checks the answers it reads back from its own cache with it too.

    Returns:
        ``None`` for valid answers, else one line saying what is wrong and what was expected.
    """
    if not isinstance(answers, Tensor):
        return f"answers must be a tensor of probabilities ({rows}, {num_classes}), got {type(answers).__name__}"
    if answers.ndim != 2 or answers.shape[0] != rows or answers.shape[1] != num_classes:
        got = tuple(answers.shape)
        if answers.ndim == 2 and answers.shape[0] != rows:
            return f"{got[0]} answers for {rows} queries (shape {got}, expected ({rows}, {num_classes}))"
        return f"answers of shape {got}, expected one probability vector per query: ({rows}, {num_classes})"
    if not answers.is_floating_point():
        return f"answers of dtype {answers.dtype}, expected floating-point probabilities"
    if rows == 0:
        return None
    values = answers.detach().double()
    bad = ~values.isfinite().all(dim=1)
    if bad.any():
        return f"{int(bad.sum())} of {rows} answers hold NaN or infinite values (the first is row {int(bad.nonzero()[0])})"
    bad = (values < -SUM_TOLERANCE).any(dim=1) | ((values.sum(dim=1) - 1).abs() > SUM_TOLERANCE)
    if bad.any():
        first = int(bad.nonzero()[0])
        return (f"{int(bad.sum())} of {rows} answers are not probability vectors (non-negative, summing to 1 within "
                f"{SUM_TOLERANCE}): row {first} sums to {float(values[first].sum()):.6g} with smallest value "
                f"{float(values[first].min()):.6g}")
    return None


def victim_name(victim: object) -> str:
    """How messages name a victim: its own ``name`` (a prediction API's URL) or its type."""
    return str(getattr(victim, "name", None) or f"the victim ({type(victim).__name__})")


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
        self._name = victim_name(victim)
        self._answer: Callable[[Tensor], object] = _sealed(victim)

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

        The victim's answers are checked (:func:`answer_problem`) before they are returned: nobody keeps an answer
        that is not one probability vector per query.

        Returns:
            Probabilities (or one-hot top-1 labels) ``(N, num_classes)``, detached, on ``x``'s device.

        Raises:
            ValueError: ``x`` is not a tensor (a numpy array, a list, ``None``), or the victim refused it; nothing was
                answered or counted.
            QueryBudgetExceeded: the batch would take the oracle past its budget (or, with a ledger, the attack's runs
                together past it); nothing was answered.
            TypeError: the victim refused the queries' type; nothing was answered.
            BadAnswers: the victim answered, but its answers are not one probability vector per query (the message
                names the victim and what is wrong); the whole batch is counted, nothing is returned.
            PartlyAnswered: the victim failed part-way through the batch; the answers to its first rows are attached
                (checked, as returned), and those with what it may have answered without the answers arriving are
                counted.
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
            self._settle(count, 0)  # (an interrupt, or an API failure after the server answered, stays charged)
            raise
        except PartlyAnswered as err:  # the victim answered the first rows, then failed: charge what it may have answered
            self._settle(count, min(count, err.charged))
            if not isinstance(err, BadAnswers) and len(err.answers):
                err.answers = self._checked(err.answers, len(err.answers), err.charged).to(x.device)
            raise
        self._settle(count, count)  # from here on the victim has answered: whatever fails, the batch stays charged
        return self._checked(answers, count, count)

    def _settle(self, reserved: int, answered: int) -> None:
        """Count ``answered`` of the ``reserved`` rows; give the ledger back the rest (the victim never saw them)."""
        self._spent += answered
        if self._ledger is not None and reserved > answered:
            self._ledger.refund(reserved - answered)

    def _checked(self, answers: object, rows: int, charged: int) -> Tensor:
        """``answers`` to ``rows`` queries, checked (and reduced to one-hot labels for a label-only oracle).

        Returns:
            The answers ``(rows, num_classes)``.

        Raises:
            BadAnswers: they are not ``rows`` probability vectors (``charged`` rows stay counted).
        """
        problem = answer_problem(answers, rows, self.num_classes)
        if problem is not None:
            raise BadAnswers(f"{self._name} answered a batch of {rows} queries with unusable answers: {problem}. Nothing "
                             f"of the batch was kept; its {charged} queries are counted, since the victim answered them. "
                             "Check the victim (its checkpoint, post-processors, or the server behind the API) before "
                             "running the attack again", charged)
        if self.label_only:
            answers = nn.functional.one_hot(answers.argmax(dim=-1), self.num_classes).to(answers.dtype)
        return answers

    def __repr__(self) -> str:
        return (
            f"BlackBoxOracle(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"spent={self._spent}, budget={self.budget}, label_only={self.label_only})"
        )


def _sealed(victim: Servable) -> Callable[[Tensor], object]:
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

    def answer(x: Tensor) -> object:
        with torch.no_grad():
            answers = victim(x.detach().to(device))
        return answers.detach().to(x.device).clone() if isinstance(answers, Tensor) else answers  # the oracle checks it

    return answer
