"""KnockoffNets' transfer set: surrogate indices and the victim's answers, bought once and kept on disk.

The set (plus the sampler's state) is written after every query batch with an atomic rename, under a
:class:`~edm_lightning.attacks.purchase.Purchase` (its lock and pending record). A re-run reads it and buys
only what is missing; a run with a smaller budget reuses a prefix (the sampling order does not depend on the
budget), so budget curves cost the largest budget once. A killed run resumes from the last saved batch, and
a batch the victim may have answered before the kill is charged to every later run that goes past it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from edm_lightning.attacks.oracle import BlackBoxOracle, answer_problem
from edm_lightning.attacks.purchase import DAMAGED, Purchase, count_problem, load_record
from edm_lightning.attacks.samplers import BanditSampler, RandomSampler, Sampler
from edm_lightning.data.perturbations import check_copies, noisy_copies
from edm_lightning.errors import ConfigError
from edm_lightning.files import save_atomic
from edm_lightning.progress import Progress

__all__ = ["Reward", "Strategy", "TransferSet", "build_transfer_set", "check_budget_buys_an_image"]

Strategy = Literal["random", "adaptive"]
Reward = Literal["cert", "div", "loss", "all"]


class TransferSet:
    """Surrogate indices, the victim's (mean) answers, and the adaptive sampler's state after the last query.

    ``query_copies`` / ``copy_noise`` / ``copy_shift`` record how each answer was bought (K perturbed
    copies averaged), so a set is never read back for another setting; each item cost ``query_copies`` queries.
    ``lost`` lists ``[items, queries]``: queries the victim may have answered in a run that was killed while
    extending the set from ``items`` items, before it saved them. A later run whose set goes past ``items``
    is charged them (it bought that stretch again); a run reading a shorter prefix never needed them.
    """

    def __init__(self, indices: Tensor, answers: Tensor, state: dict | None = None, query_copies: int = 1,
                 copy_noise: float = 0.0, copy_shift: int = 0, lost: list[list[int]] | None = None):
        self.indices, self.answers, self.state = indices, answers, state
        self.query_copies, self.copy_noise, self.copy_shift = int(query_copies), float(copy_noise), int(copy_shift)
        self.lost = [[int(offset), int(queries)] for offset, queries in (lost or [])]

    @property
    def setting(self) -> tuple[int, float, int]:
        """``(query_copies, copy_noise, copy_shift)``: how each item was queried; a cache of another setting is refused."""
        return self.query_copies, self.copy_noise, self.copy_shift

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def queries(self) -> int:
        """Queries the set cost: every copy of every item, and the answers lost to killed runs on the way."""
        return len(self) * self.query_copies + self.charged(len(self))

    def charged(self, items: int) -> int:
        """Lost queries a run holding the first ``items`` items pays: those lost on the way to them."""
        return sum(queries for offset, queries in self.lost if offset < items)

    def items_within(self, budget: int) -> int:
        """The most items a run with ``budget`` may hold: ``query_copies`` per item plus what it is :meth:`charged`."""
        events = sorted(self.lost)
        best, paid, lower = 0, 0, -1
        for j in range(len(events) + 1):  # region j: holding more than events[j-1]'s offset, at most events[j]'s
            cap = (budget - paid) // self.query_copies
            n = cap if j == len(events) else min(cap, events[j][0])
            if n > lower:
                best = max(best, n)
            if j < len(events):
                paid, lower = paid + events[j][1], events[j][0]
        return max(0, best)

    def head(self, n: int) -> TransferSet:
        """The first ``n`` items (a smaller budget's transfer set), with the sampler state only if nothing was cut."""
        return TransferSet(self.indices[:n], self.answers[:n], self.state if n >= len(self) else None, *self.setting,
                           lost=self.lost)

    def save(self, path: Path) -> None:
        """Write the set atomically (a kill leaves the old file or the new one)."""
        save_atomic({"indices": self.indices, "answers": self.answers, "state": self.state, "lost": self.lost,
                     "query_copies": self.query_copies, "copy_noise": self.copy_noise, "copy_shift": self.copy_shift}, path)

    @classmethod
    def load(cls, path: Path) -> TransferSet:
        """Read a set written by :meth:`save`, checked like input from outside: a file that is not one (truncated, a
        pickle of anything else: a cache folder may hold files from anyone) is refused without running any of its
        code, and so is one whose contents do not fit together (answers that are not one probability vector per
        item, a ``lost`` record that is not whole non-negative counts within the set): a damaged record could
        otherwise let a run buy past its budget.

        Returns:
            The transfer set the file holds.

        Raises:
            ConfigError: the file is not a readable, whole transfer set; the message names it and what is wrong.
        """
        blob = load_record(path, "transfer set", ("indices", "answers", "state"))
        indices, answers, state = blob["indices"], blob["answers"], blob["state"]
        setting = (blob.get("query_copies", 1), blob.get("copy_noise", 0.0), blob.get("copy_shift", 0))
        try:
            check_copies(*setting)
            problem = None
        except ConfigError as err:
            problem = str(err)
        if problem is None and (not isinstance(indices, Tensor) or indices.ndim != 1 or indices.is_floating_point()
                                or indices.dtype == torch.bool or (len(indices) and int(indices.min()) < 0)):
            problem = "its indices are not a vector of surrogate image positions"
        if problem is None:
            classes = answers.shape[-1] if isinstance(answers, Tensor) and answers.ndim else 0
            problem = answer_problem(answers, len(indices), classes)
        if problem is None and state is not None and not isinstance(state, dict):
            problem = f"its sampler state is a {type(state).__name__}, not a mapping"
        lost = None
        if problem is None:
            lost, problem = _lost_events(blob.get("lost"), len(indices))
        if problem is not None:
            raise ConfigError(f"{str(path)!r} is not a whole transfer set ({problem}); {DAMAGED}")
        return cls(indices.long(), answers, state, *setting, lost=lost)

    def check_fits(self, path: Path, num_classes: int, pool_size: int) -> None:
        """Refuse a set read back that does not fit this attack: answers over another class count, or indices past
        the surrogate's ``pool_size`` images.

        Raises:
            ConfigError: it does not fit; the message names ``path``.
        """
        if len(self) and self.answers.shape[1] != num_classes:
            raise ConfigError(f"{str(path)!r} holds answers over {self.answers.shape[1]} classes, but the victim has "
                              f"{num_classes}; {DAMAGED}")
        if len(self) and int(self.indices.max()) >= pool_size:
            raise ConfigError(f"{str(path)!r} holds surrogate image {int(self.indices.max())}, past the surrogate's "
                              f"{pool_size} images; {DAMAGED}")


def build_transfer_set(
    open_oracle,
    images: Tensor,
    labels: Tensor,
    budget: int,
    cache_path: str | Path,
    strategy: Strategy = "random",
    reward: Reward = "all",
    batch_size: int = 128,
    seed: int = 0,
    policy: torch.nn.Module | None = None,
    policy_lr: float = 1e-3,
    diversity_window: int = 1000,
    query_copies: int = 1,
    copy_noise: float = 0.0,
    copy_shift: int = 0,
    query_batch_size: int | None = None,
) -> TransferSet:
    """The first ``budget`` queries of KnockoffNets' sampling, bought once and kept in ``cache_path``.

    With ``query_copies = K`` that is ``budget // K`` images, each answered by the mean of K perturbed
    copies (:func:`noisy_copies`). Each oracle call of the random strategy carries ``query_batch_size``
    queries (default ``batch_size``), of the adaptive one ``batch_size`` (its policy learns after each call);
    that is ``// K`` images, at least 1.
    One process buys a set at a time (a lock beside the file): another budget of the same attack, or a
    second runner, waits and then reads what the first bought instead of paying again. Before each oracle
    call the batch is recorded as pending (``<cache>.pending``) and cleared once its answers are saved: a
    run killed in between leaves the record, and the next run charges those queries as lost (the victim
    may have answered them), so the victim never answers more than ``budget`` over all runs. A kill after
    the record but before the call is charged too: the count errs towards the budget, never past it. A run that
    holds fewer items than its budget would buy because a batch lost just past them took the rest is charged that
    batch as well (up to its budget), so its count is never below what the victim answered for it.

    Args:
        open_oracle: ``spent -> BlackBoxOracle``; called once with the queries the cache already holds
            (capped at ``budget``), so a resumed run can never spend more than ``budget`` in all.
        images: the surrogate's uint8 images, already in the victim's input shape.
        labels: the surrogate's labels (the adaptive strategy's arms).
        budget: most queries, over this run and every earlier one on the same cache.
        cache_path: the transfer set's file (with its lock and pending record beside it).
        strategy: ``random`` (uniform sampling) or ``adaptive`` (KnockoffNets' gradient bandit over ``labels``).
        reward: the adaptive strategy's reward: ``cert`` (certainty), ``div`` (diversity), ``loss`` or ``all``.
        batch_size: queries per adaptive step.
        seed: seed of the sampling.
        policy: the adaptive strategy's online clone (trained one step per batch for the loss reward).
        policy_lr: that clone's learning rate.
        diversity_window: answers the diversity reward compares against.
        query_copies: K, copies per image (the oracle counts each).
        copy_noise: std of the Gaussian noise on each copy.
        copy_shift: largest random shift of each copy, in pixels.
        query_batch_size: queries per oracle call of the random strategy (``None``: ``batch_size``).

    Returns:
        The transfer set: at most ``budget`` queries' worth of surrogate indices and the victim's answers.
    """
    check_copies(query_copies, copy_noise, copy_shift)
    check_budget_buys_an_image(budget, query_copies)
    with Purchase(cache_path) as purchase:  # one buyer per transfer set at a time
        rows = query_batch_size if strategy == "random" and query_batch_size else batch_size
        return _extend_transfer_set(purchase, open_oracle, images, labels, budget, strategy, reward, rows, seed,
                                    policy, policy_lr, diversity_window, query_copies, copy_noise, copy_shift)


def _extend_transfer_set(purchase: Purchase, open_oracle, images: Tensor, labels: Tensor, budget: int, strategy: Strategy,
                         reward: Reward, batch_size: int, seed: int, policy: torch.nn.Module | None, policy_lr: float,
                         diversity_window: int, query_copies: int, copy_noise: float, copy_shift: int) -> TransferSet:
    cache_path = purchase.path
    setting = (query_copies, float(copy_noise), int(copy_shift))
    cached = TransferSet.load(cache_path) if cache_path.is_file() else TransferSet(
        torch.empty(0, dtype=torch.long), torch.empty(0, 0), None, *setting)
    if cached.setting != setting:
        raise ConfigError(
            f"transfer set {str(cache_path)!r} was bought with query_copies={cached.query_copies}, "
            f"copy_noise={cached.copy_noise}, copy_shift={cached.copy_shift}, not {', '.join(map(str, setting))}: "
            "give each setting its own cache path"
        )
    record = purchase.take_pending()
    if record is not None and record["items"] > len(cached):
        raise ConfigError(f"{str(purchase.pending_path)!r} records queries lost after item {record['items']}, but "
                          f"{str(cache_path)!r} holds {len(cached)} items: the two do not belong together; {DAMAGED}")
    if record is not None:  # a run was killed between asking the victim and saving the answers: charge them
        cached.lost.append([record["items"], record["queries"]])
        cached.save(cache_path)
        purchase.settle()
    items = cached.items_within(budget)
    if items == 0:
        raise ConfigError(f"the budget of {budget} queries was spent on {sum(q for _, q in cached.lost)} answers lost to "
                          "interrupted runs "
                          f"of this attack ({str(cache_path)!r}); raise the budget")
    spent = cached.charged(items) + min(len(cached), items) * query_copies
    if items < budget // query_copies:  # the run wanted more, but what was lost at its end ate the rest: it paid that too
        spent += min(budget - spent, sum(queries for offset, queries in cached.lost if offset == items))
    oracle: BlackBoxOracle = open_oracle(spent)
    cached.check_fits(cache_path, oracle.num_classes, len(images))
    if len(cached) >= items:
        return cached.head(items)
    sampler: Sampler
    if strategy == "random":
        sampler = RandomSampler(len(images), seed)
    elif strategy == "adaptive":
        if policy is None:
            raise ConfigError("the adaptive strategy needs a policy network (its online clone)")
        sampler = BanditSampler(labels, oracle.num_classes, policy, policy_lr, reward, diversity_window, seed)
    else:
        raise ConfigError(f"unknown strategy {strategy!r}: expected 'random' or 'adaptive'")
    if cached.state is not None:
        try:
            sampler.load_state_dict(cached.state)
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            raise ConfigError(f"{str(cache_path)!r} holds a sampler state this attack cannot resume from ({err}); "
                              f"{DAMAGED}") from None
    indices, answers = ([cached.indices], [cached.answers]) if len(cached) else ([], [])
    done = len(cached)
    per_call = max(1, batch_size // query_copies)
    progress = Progress(items * query_copies, "buying the transfer set", "queries", initial=done * query_copies)

    def keep(chosen: Tensor, x: Tensor, y: Tensor) -> None:  # the answers to the first len(y) // K items
        nonlocal done
        n = len(y) // query_copies
        if query_copies > 1:
            y = y.view(n, query_copies, -1).mean(dim=1)
        sampler.update(x[:n], y)
        indices.append(chosen[:n])
        answers.append(y)
        done += n
        TransferSet(torch.cat(indices), torch.cat(answers), sampler.state_dict(), *setting, lost=cached.lost).save(cache_path)
        progress.update(n * query_copies)

    while done < items:
        count = min(per_call, items - done)
        chosen = sampler.draw(done, count)
        x = images[chosen].float().div_(255)
        plain = query_copies == 1 and copy_noise == 0 and copy_shift == 0
        queries = x if plain else noisy_copies(x, query_copies, copy_noise, seed, done, copy_shift)
        purchase.buy(oracle, queries, items=done, keep=partial(keep, chosen, x), rows_per_item=query_copies)
    progress.close()
    return TransferSet(torch.cat(indices), torch.cat(answers), sampler.state_dict(), *setting, lost=cached.lost)


def _lost_events(lost: object, items: int) -> tuple[list[list[int]] | None, str | None]:
    """``[[items, queries], ...]`` read back, or what is wrong with it; a plain count (sets written before the offsets
    were kept) is charged to every run.

    Returns:
        ``(events, None)``, or ``(None, the problem)`` when ``lost`` is not pairs of whole non-negative counts with
        offsets within the set's ``items``.
    """
    if lost is None:
        return [], None
    if not isinstance(lost, (list, tuple)):
        lost = [[0, lost]]
    events = []
    for event in lost:
        pair = dict(zip(("offset", "queries"), event)) if isinstance(event, (list, tuple)) and len(event) == 2 else None
        problem = count_problem(pair, ("offset", "queries")) if pair is not None else f"an entry {event!r}"
        if problem is None and pair["offset"] > items:
            problem = f"queries lost at item {pair['offset']} of a set of {items}"
        if problem is not None:
            return None, f"its record of lost queries is damaged: {problem}"
        if pair["queries"]:
            events.append([pair["offset"], pair["queries"]])
    return events, None


def check_budget_buys_an_image(budget: int, query_copies: int) -> None:
    """Refuse a budget that cannot buy one image sent as ``query_copies`` copies.

    Raises:
        ConfigError: ``budget < query_copies``.
    """
    if budget < query_copies:
        raise ConfigError(f"budget={budget} cannot buy one image sent as query_copies={query_copies} copies: raise the budget")
