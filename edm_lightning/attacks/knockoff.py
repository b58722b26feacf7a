"""KnockoffNets (Orekondy et al., CVPR 2019): buy the victim's answers on a surrogate dataset, train a clone.

The attacker draws B images from a surrogate (natural images of another task: MNIST for a
FashionMNIST victim), queries the victim once for each, and trains a clone on the (image, answer)
transfer set with soft-label cross-entropy. Two sampling strategies (paper Sec. 4.1):

* ``random``: B images uniformly, without replacement (cycling only when B exceeds the surrogate).
* ``adaptive``: a gradient bandit over the surrogate's classes (Sutton & Barto 2.8): class ``z`` is
  drawn from ``pi = softmax(H)``, an image of that class is queried, and ``H`` moves by the reward
  relative to its running mean. Rewards (paper Eq. 2-4): certainty (margin of the top-2 answer
  probabilities), diversity (answer mass above the recent mean answer) and loss (cross-entropy of an
  online clone's prediction against the answer); ``all`` averages the three after standardising each
  by its running mean and variance.

The transfer set (surrogate indices and answers, plus the sampler's state) is written to disk after
every query batch with an atomic rename. A re-run reads it and buys only what is missing; a run
with a smaller budget reuses a prefix (the sampling order does not depend on B), so budget curves
cost the largest budget once. A killed run resumes from the last saved batch.

Query averaging (an adaptive attack on EDM): with ``query_copies = K`` each surrogate image is sent as K
copies with faint Gaussian noise (``copy_noise``, std in [0, 1] pixel units, clamped to [0, 1]) and the
clone trains on the mean answer. Against a router that scatters near-identical inputs over members
(a keyed byte hash), the mean approaches the ensemble's average, which EDM's members were trained to
keep accurate only in distribution; a neural hash sends the copies to one member and the mean buys
nothing. An attacker who knows the router is a neural hash (but not its weights) knows faint noise will
not move a query to another member and shifts each copy by up to ``copy_shift`` pixels instead, which
changes what the hash network sees far more. The budget counts every copy (the oracle counts rows): a
budget B buys B // K images, K times the queries per transfer-set item, and the report says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import torch
from filelock import FileLock
from torch import Tensor
from typing_extensions import override

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.oracle import BlackBoxOracle
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob
from edm_lightning.data.datamodules import ProbeDataModule
from edm_lightning.data.images import BatchTensorDataset
from edm_lightning.defense import VictimConfig, VictimProbe
from edm_lightning.errors import ConfigError, unreadable_file_reason
from edm_lightning.files import save_atomic
from edm_lightning.models.clone import CloneModule, clone_loss
from edm_lightning.models.mixture_clone import MixtureCloneModule
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig
from edm_lightning.progress import Progress

__all__ = ["CopySpreadModule", "KnockoffDataModule", "Sampler", "TransferSet", "build_transfer_set", "knockoff_job",
           "noisy_copies", "run_knockoff"]

Strategy = Literal["random", "adaptive"]
Reward = Literal["cert", "div", "loss", "all"]


class KnockoffDataModule(AttackDataModule):
    """The KnockoffNets transfer set as training data for a :class:`CloneModule`.

    ``prepare_data`` buys (or reuses) the transfer set; under DDP it runs on global rank 0 only, so the
    budget is spent once, and ``setup`` reads the set back from ``cache_dir`` on every process.

    Args:
        victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed:
            see :class:`~edm_lightning.attacks.AttackDataModule`; ``budget`` is the transfer-set size.
        surrogate: registry name of the attacker's natural images (converted to the victim's shape).
        strategy: ``random`` or ``adaptive`` sampling.
        reward: the adaptive strategy's reward: ``cert``, ``div``, ``loss`` or ``all``.
        policy_arch: architecture of the adaptive strategy's online clone (for the loss reward).
        policy_lr: Adam learning rate of that online clone (one step per query batch).
        diversity_window: horizon (in queries) of the mean answer the diversity reward compares with.
        query_copies: K, the copies sent per surrogate image (1: plain KnockoffNets); answers are averaged.
        copy_noise: std of the Gaussian noise added to each copy (images in [0, 1]; 0: exact copies).
        copy_shift: each copy is shifted by a random offset of up to this many pixels in each direction
            (zero fill), before the noise; 0: no shift.
        query_batch_size: queries (rows, copies included) per oracle call of the random strategy; the answers
            do not depend on it, only the buying speed does (the adaptive strategy queries ``batch_size`` at a
            time, since its policy learns after every call).
    """

    def __init__(
        self,
        victim: VictimConfig | RemoteVictimConfig,
        dataset: str = "fashionmnist",
        surrogate: str = "mnist",
        strategy: Strategy = "random",
        reward: Reward = "all",
        budget: int = 50_000,
        label_only: bool = False,
        policy_arch: str = "lenet5",
        policy_lr: float = 1e-3,
        diversity_window: int = 1000,
        query_copies: int = 1,
        copy_noise: float = 0.0,
        copy_shift: int = 0,
        query_batch_size: int = 1024,
        root: str = "data",
        batch_size: int = 128,
        test_size: int | None = None,
        cache_dir: str = "runs/attacks/cache",
        num_workers: int = 0,
        seed: int = 0,
    ):
        if strategy not in ("random", "adaptive"):
            raise ConfigError(f"unknown strategy {strategy!r}: expected 'random' or 'adaptive'")
        if reward not in ("cert", "div", "loss", "all"):
            raise ConfigError(f"unknown reward {reward!r}: expected 'cert', 'div', 'loss' or 'all'")
        if diversity_window <= 0 or policy_lr <= 0:
            raise ConfigError("diversity_window and policy_lr must be positive")
        if isinstance(query_batch_size, bool) or not isinstance(query_batch_size, int) or query_batch_size < 1:
            raise ConfigError(f"query_batch_size must be a positive integer (queries per oracle call), got {query_batch_size!r}")
        _check_copies(query_copies, copy_noise, copy_shift)
        _check_budget_buys_an_image(budget, query_copies)
        if surrogate == dataset:
            raise ConfigError(
                f"the surrogate set must not be the victim's own dataset {dataset!r}: KnockoffNets' attacker has no "
                "in-distribution data (that is JBDA's setting). Choose natural images of another dataset (mnist, cifar100)."
            )
        super().__init__(victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed)
        self.save_hyperparameters(ignore=["victim"])
        self.load_attacker_images(surrogate, train=True, check_only=True)  # shape convertibility, before any query
        self._surrogate: tuple[Tensor, Tensor] | None = None
        self.transfer: TransferSet | None = None
        # Buy the transfer set on global rank 0 only, not once per node: on several nodes the budget would
        # otherwise be spent once per node. The other processes read it back from cache_dir, which on a
        # multi-node job must be on a filesystem all nodes share (runs/ usually is).
        self.prepare_data_per_node = False

    @property
    def cache_path(self) -> Path:
        """The transfer set's file, keyed by victim, seed and sampling setting (never by budget)."""
        hp = self.hparams
        attack = {"attack": "knockoff", "surrogate": hp.surrogate, "strategy": hp.strategy}
        if hp.strategy == "adaptive":
            attack.update(reward=hp.reward, policy_arch=hp.policy_arch, policy_lr=hp.policy_lr,
                          window=hp.diversity_window, batch_size=hp.batch_size)
        if hp.query_copies != 1 or hp.copy_noise != 0:  # plain KnockoffNets keeps its earlier keys
            attack.update(query_copies=hp.query_copies, copy_noise=float(hp.copy_noise))
        if hp.copy_shift:
            attack.update(copy_shift=hp.copy_shift)
        return self.cache_dir / f"knockoff-{self.cache_key(**attack)}.pt"

    @override
    def prepare_data(self) -> None:
        if self.transfer is not None:
            return
        images, labels = self._surrogate_images()
        hp = self.hparams
        policy = None
        if hp.strategy == "adaptive":
            policy = build_net(hp.policy_arch, self.input_shape, self.num_classes, self.mean, self.std)
        self.transfer = build_transfer_set(
            self.open_oracle, images, labels, hp.budget, self.cache_path, strategy=hp.strategy, reward=hp.reward,
            batch_size=hp.batch_size, seed=hp.seed, policy=policy, policy_lr=hp.policy_lr,
            diversity_window=hp.diversity_window, query_copies=hp.query_copies, copy_noise=hp.copy_noise,
            copy_shift=hp.copy_shift, query_batch_size=hp.query_batch_size,
        )

    @override
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.train_set is None:
            if self.transfer is None:  # another process bought it (DDP): read it back, as rank 0 left it
                with FileLock(self.cache_path.with_name(self.cache_path.name + ".lock")):
                    bought = TransferSet.load(self.cache_path)
                items = bought.items_within(self.hparams.budget)
                self.transfer = bought.head(items)
                if len(self.transfer) < items:
                    raise RuntimeError(f"transfer set {self.cache_path} holds {len(self.transfer)} of {items} images")
            images, _ = self._surrogate_images()
            x = images[self.transfer.indices].float().div_(255)
            self.train_set = BatchTensorDataset(x, self.transfer.answers)

    def figures(self) -> dict[str, Any]:
        """The attack's name (strategy, averaging) and the transfer set's size in items and queries."""
        hp = self.hparams
        items = len(self.transfer or ())
        return {"attack": f"knockoff-{hp.strategy}" + (f"-avg{hp.query_copies}" if hp.query_copies > 1 else ""),
                "surrogate": hp.surrogate, "transfer_set": items, "query_copies": hp.query_copies,
                "copy_noise": float(hp.copy_noise), "copy_shift": hp.copy_shift, "queries_per_item": hp.query_copies,
                "extra_queries": items * (hp.query_copies - 1),
                "lost_queries": self.transfer.charged(items) if self.transfer else 0}

    def _surrogate_images(self) -> tuple[Tensor, Tensor]:
        if self._surrogate is None:
            self._surrogate = self.load_attacker_images(self.hparams.surrogate, train=True)
        return self._surrogate


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
        """Read a set written by :meth:`save`; a file that is not one (truncated, or a pickle of anything else:
        a cache folder may hold files from anyone) is refused without running any of its code.

        Returns:
            The transfer set the file holds.

        Raises:
            ConfigError: the file is not a readable transfer set; the message names it and says to delete it.
        """
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            blob["indices"], blob["answers"], blob["state"]  # noqa: B018 - a file without them is not a transfer set
        except Exception as err:
            raise ConfigError(f"{str(path)!r} is not a readable transfer set ({unreadable_file_reason(err)}); delete it "
                              "and run again to buy the set afresh") from None
        return cls(blob["indices"], blob["answers"], blob["state"], blob.get("query_copies", 1), blob.get("copy_noise", 0.0),
                   blob.get("copy_shift", 0), _lost_events(blob.get("lost")))


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
    the record but before the call is charged too: the count errs towards the budget, never past it.

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
    _check_copies(query_copies, copy_noise, copy_shift)
    _check_budget_buys_an_image(budget, query_copies)
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_path.with_name(cache_path.name + ".lock")):  # one buyer per transfer set at a time
        rows = query_batch_size if strategy == "random" and query_batch_size else batch_size
        return _extend_transfer_set(open_oracle, images, labels, budget, cache_path, strategy, reward, rows, seed,
                                    policy, policy_lr, diversity_window, query_copies, copy_noise, copy_shift)


def _extend_transfer_set(open_oracle, images: Tensor, labels: Tensor, budget: int, cache_path: Path, strategy: Strategy,
                         reward: Reward, batch_size: int, seed: int, policy: torch.nn.Module | None, policy_lr: float,
                         diversity_window: int, query_copies: int, copy_noise: float, copy_shift: int) -> TransferSet:
    setting = (query_copies, float(copy_noise), int(copy_shift))
    for stale in cache_path.parent.glob(f".{cache_path.name}.*.tmp"):  # a save killed half-way (we hold the lock)
        stale.unlink()
    cached = TransferSet.load(cache_path) if cache_path.is_file() else TransferSet(
        torch.empty(0, dtype=torch.long), torch.empty(0, 0), None, *setting)
    if cached.setting != setting:
        raise ConfigError(
            f"transfer set {str(cache_path)!r} was bought with query_copies={cached.query_copies}, "
            f"copy_noise={cached.copy_noise}, copy_shift={cached.copy_shift}, not {', '.join(map(str, setting))}: "
            "give each setting its own cache path"
        )
    pending = cache_path.with_name(cache_path.name + ".pending")
    if pending.is_file():  # a run was killed between asking the victim and saving the answers: charge them
        record = torch.load(pending, weights_only=True)
        cached.lost.append([int(record["items"]), int(record["queries"])])
        cached.save(cache_path)
        pending.unlink()
    items = cached.items_within(budget)
    if items == 0:
        raise ConfigError(f"the budget of {budget} queries was spent on {sum(q for _, q in cached.lost)} answers lost to "
                          "interrupted runs "
                          f"of this attack ({str(cache_path)!r}); raise the budget")
    oracle: BlackBoxOracle = open_oracle(cached.charged(items) + min(len(cached), items) * query_copies)
    if len(cached) >= items:
        return cached.head(items)
    sampler: Sampler
    if strategy == "random":
        sampler = _RandomSampler(len(images), seed)
    elif strategy == "adaptive":
        if policy is None:
            raise ConfigError("the adaptive strategy needs a policy network (its online clone)")
        sampler = _BanditSampler(labels, oracle.num_classes, policy, policy_lr, reward, diversity_window, seed)
    else:
        raise ConfigError(f"unknown strategy {strategy!r}: expected 'random' or 'adaptive'")
    if cached.state is not None:
        sampler.load_state_dict(cached.state)
    indices, answers = ([cached.indices], [cached.answers]) if len(cached) else ([], [])
    done = len(cached)
    per_call = max(1, batch_size // query_copies)
    progress = Progress(items * query_copies, "buying the transfer set", "queries", initial=done * query_copies)
    while done < items:
        count = min(per_call, items - done)
        chosen = sampler.draw(done, count)
        x = images[chosen].float().div_(255)
        save_atomic({"items": done, "queries": count * query_copies}, pending)  # before the victim answers
        spent = oracle.queries_spent
        try:
            if query_copies == 1 and copy_noise == 0 and copy_shift == 0:
                y = oracle(x)
            else:
                copies = noisy_copies(x, query_copies, copy_noise, seed, done, copy_shift)
                y = oracle(copies).view(count, query_copies, -1).mean(dim=1)
        except Exception:  # refused or failed before the victim answered (budget, bad input): nothing to charge
            if oracle.queries_spent == spent:
                pending.unlink()
            raise
        sampler.update(x, y)
        indices.append(chosen)
        answers.append(y)
        done += count
        TransferSet(torch.cat(indices), torch.cat(answers), sampler.state_dict(), *setting, lost=cached.lost).save(cache_path)
        pending.unlink()
        progress.update(count * query_copies)
    progress.close()
    return TransferSet(torch.cat(indices), torch.cat(answers), sampler.state_dict(), *setting, lost=cached.lost)


def _lost_events(lost) -> list[list[int]]:
    """``[[items, queries], ...]``; a plain count (sets written before the offsets were kept) is charged to every run."""
    if isinstance(lost, int):
        return [[0, lost]] if lost else []
    return [[int(offset), int(queries)] for offset, queries in (lost or [])]


def noisy_copies(x: Tensor, copies: int, noise: float, seed: int = 0, start: int = 0, shift: int = 0) -> Tensor:
    """``copies`` versions of each image in ``x`` ``(N, C, H, W)``, in order ``(N * copies, C, H, W)``.

    Each copy is shifted by a random offset in ``[-shift, shift]`` pixels per axis (zero fill), then
    ``clamp(copy + noise * eps, 0, 1)`` with Gaussian ``eps``. Both are drawn per image from
    ``(seed, start + i)``, so item ``i`` of a transfer set always gets the same copies, however the run
    was split into batches.

    Returns:
        The copies ``(N * copies, C, H, W)`` in [0, 1].
    """
    out = x.repeat_interleave(copies, dim=0)
    if noise == 0 and shift == 0:
        return out
    # CPU generators keep only the low 32 bits of a seed (seed * 2**32 + i would repeat across seeds):
    # items below a million get distinct streams for every seed below 4,294.
    generators = [torch.Generator().manual_seed((seed * 1_000_003 + start + i) % 2**32) for i in range(len(x))]
    eps = torch.cat([torch.randn((copies, *x.shape[1:]), generator=g) for g in generators]).to(x.device)
    if shift > 0:
        offsets = torch.cat([torch.randint(-shift, shift + 1, (copies, 2), generator=g) for g in generators])
        padded = torch.nn.functional.pad(out, (shift, shift, shift, shift))
        height, width = x.shape[-2:]
        out = torch.stack([padded[j, :, shift + dy: shift + dy + height, shift + dx: shift + dx + width]
                           for j, (dy, dx) in enumerate(offsets.tolist())])
    return (out + noise * eps).clamp_(0, 1) if noise > 0 else out


class CopySpreadModule(VictimProbe):
    """How far query averaging spreads behind a router, probed with the attacker's surrogate images (a
    :class:`~edm_lightning.data.ProbeDataModule` with ``sets: [surrogate]``): how many distinct members the
    ``copies`` noisy copies of one image reach (:func:`noisy_copies`, the copies KnockoffNets' query averaging
    sends), and the share of copies answered by the member the unperturbed image gets.

    After ``main.py test``, :attr:`figures` holds ``distinct_members``, ``distinct_if_random`` (the same for a
    uniform random router: ``N (1 - (1 - 1/N)^K)``) and ``share_on_plain_member``; all three are also logged.

    Args:
        copies: copies per image (K).
        copy_noise: Gaussian noise std of each copy (images in [0, 1]).
        copy_shift: largest random shift of each copy, in pixels.
        seed: the copies' seed (as KnockoffNets' ``seed``).
        others: as :class:`~edm_lightning.defense.VictimProbe`.
    """

    def __init__(self, victim: VictimConfig, copies: int = 8, copy_noise: float = 0.0, copy_shift: int = 0, seed: int = 0,
                 num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__(victim, num_classes, input_shape, mean, std)
        _check_copies(copies, copy_noise, copy_shift)
        self.copies, self.copy_noise, self.copy_shift, self.seed = copies, copy_noise, copy_shift, seed
        self.figures: dict[str, float] = {}
        self._distinct: list[Tensor] = []
        self._on_plain: list[Tensor] = []
        self._seen = 0

    @override
    def check_data(self, datamodule: L.LightningDataModule | None) -> None:
        if not isinstance(datamodule, ProbeDataModule) or datamodule.sets != ["surrogate"]:
            raise ConfigError("CopySpreadModule is probed with the attacker's images alone: a ProbeDataModule with "
                              "sets: [surrogate]")

    @override
    def on_test_epoch_start(self) -> None:
        self._distinct, self._on_plain, self._seen = [], [], 0

    @override
    def test_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        router = self.victim.router
        copies = noisy_copies(batch, self.copies, self.copy_noise, self.seed, start=self._seen, shift=self.copy_shift)
        self._seen += len(batch)
        plain, routes = router(batch), router(copies).view(len(batch), self.copies)
        self._distinct.append(torch.tensor([len(torch.unique(row)) for row in routes], dtype=torch.float64))
        self._on_plain.append(routes == plain[:, None])

    @override
    def on_test_epoch_end(self) -> None:
        if not self._distinct:
            raise ConfigError("no surrogate images reached CopySpreadModule: check the ProbeDataModule's images")
        members = self.victim.router.num_members
        self.figures = {"distinct_members": float(torch.cat(self._distinct).mean()),
                        "distinct_if_random": members * (1 - (1 - 1 / members) ** self.copies),
                        "share_on_plain_member": float(torch.cat(self._on_plain).double().mean())}
        for name, value in self.figures.items():
            self.log(f"test/{name}", value)


def knockoff_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    surrogate: str = "mnist",
    strategy: Strategy = "random",
    budget: int = 50_000,
    label_only: bool = False,
    arch: str = "lenet5",
    optim: OptimConfig | None = None,
    max_epochs: int = 20,
    batch_size: int = 128,
    cache_dir: str = "runs/attacks/cache",
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
    clone_heads: int = 1,
    shared_trunk: bool = True,
    assignment: str = "soft",
    **options: Any,
) -> AttackJob:
    """KnockoffNets as a job: the DataModule and clone of ``python main.py fit --config configs/attack/knockoff.yaml``.

    ``options`` go to :class:`KnockoffDataModule` (``reward``, ``policy_lr``, ``query_copies``, ``copy_noise``,
    ``copy_shift`` ...). ``clone_heads > 1`` trains a :class:`~edm_lightning.models.MixtureCloneModule`
    (``shared_trunk``, ``assignment``) on the same transfer set: the attack that knows EDM serves each query
    with one of N members; it buys nothing more than plain KnockoffNets with the same sampling settings.

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`); nothing is built or bought yet.

    Raises:
        ConfigError: ``clone_heads`` is not a whole number >= 1.
    """
    if isinstance(clone_heads, bool) or not isinstance(clone_heads, int) or clone_heads < 1:
        raise ConfigError(f"clone_heads must be a whole number >= 1 (1: the plain clone), got {clone_heads!r}")
    data_args = dict(victim=victim, dataset=dataset, surrogate=surrogate, strategy=strategy, budget=budget,
                     label_only=label_only, root=root, batch_size=batch_size, test_size=test_size, cache_dir=cache_dir,
                     seed=seed, **options)
    module_args: dict[str, Any] = dict(arch=arch, optim=optim or OptimConfig(name="adam", lr=1e-3, schedule="cosine"))
    if clone_heads > 1:
        module_args |= dict(heads=clone_heads, shared_trunk=shared_trunk, assignment=assignment)
    module = MixtureCloneModule if clone_heads > 1 else CloneModule
    return AttackJob(module, module_args, KnockoffDataModule, data_args, max_epochs, seed)


def run_knockoff(victim: VictimConfig | RemoteVictimConfig, *, trainer: dict[str, Any] | None = None,
                 **settings: Any) -> dict[str, Any]:
    """KnockoffNets end to end from Python: the figures as a dict.

    Args:
        victim: the victim to steal from.
        trainer: Trainer arguments (``accelerator``, ``devices``, ``precision``, ``logger``, ...).
        settings: :func:`knockoff_job`'s arguments (``budget``, ``surrogate``, ``max_epochs``, ``clone_heads`` ...).

    Returns:
        The figures of :func:`~edm_lightning.attacks.run_attack` plus the transfer set's size.

    Raises:
        ConfigError: a setting :func:`knockoff_job` or the DataModule refuses.
    """
    return knockoff_job(victim, **settings).run(trainer)


def _check_copies(query_copies: int, copy_noise: float, copy_shift: int = 0) -> None:
    if isinstance(query_copies, bool) or not isinstance(query_copies, int) or query_copies < 1:
        raise ConfigError(f"query_copies must be an integer >= 1 (copies sent per surrogate image), got {query_copies!r}")
    if not 0 <= copy_noise <= 1:
        raise ConfigError(f"copy_noise must be in [0, 1] (noise std, images in [0, 1]), got {copy_noise!r}")
    if isinstance(copy_shift, bool) or not isinstance(copy_shift, int) or not 0 <= copy_shift <= 8:
        raise ConfigError(f"copy_shift must be an integer in [0, 8] (largest shift of a copy, in pixels), got {copy_shift!r}")


def _check_budget_buys_an_image(budget: int, query_copies: int) -> None:
    if budget < query_copies:
        raise ConfigError(f"budget={budget} cannot buy one image sent as query_copies={query_copies} copies: raise the budget")


class Sampler(Protocol):
    """How KnockoffNets picks the next surrogate images to query; resumable from its ``state_dict``."""

    def draw(self, start: int, count: int) -> Tensor:
        """Surrogate indices ``(count,)`` of the transfer set's items ``start .. start + count - 1``."""
        ...

    def update(self, x: Tensor, answers: Tensor) -> None:
        """Learn from the victim's ``answers`` ``(n, K)`` to the queried images ``x`` ``(n, C, H, W)``."""
        ...

    def state_dict(self) -> dict | None:
        """What a resumed run needs to continue the same draws (``None``: nothing)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved :meth:`state_dict`."""
        ...


class _RandomSampler:
    """Uniform draws without replacement; position ``i`` of the order depends only on ``seed`` and ``i``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, Tensor] = {}

    def draw(self, start: int, count: int) -> Tensor:
        positions = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in positions]) if count else positions

    def _perm(self, cycle: int) -> Tensor:
        if cycle not in self._perms:
            self._perms[cycle] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + cycle))
        return self._perms[cycle]

    def update(self, x: Tensor, answers: Tensor) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class _BanditSampler:
    """KnockoffNets' adaptive strategy: a gradient bandit over surrogate classes (paper Sec. 4.1.2).

    Queries are drawn a batch at a time from the current policy; the policy then takes one
    gradient-bandit step per query, in order, with step size ``1 / N(z)`` (the arm's pull count),
    as in the paper's Algorithm 1. The loss reward uses the online clone's prediction *before* it is
    trained on the batch, i.e. how much the answer would still teach it.
    """

    def __init__(self, labels: Tensor, num_classes: int, policy: torch.nn.Module, lr: float, reward: str,
                 window: int, seed: int):
        self.classes = torch.unique(labels)
        self.members = [(labels == c).nonzero(as_tuple=True)[0] for c in self.classes]
        self.policy, self.reward, self.window = policy, reward, window
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        arms = len(self.classes)
        self.h = torch.zeros(arms, dtype=torch.float64)
        self.pulls = torch.zeros(arms, dtype=torch.float64)
        self.seen = 0
        self.mean_reward = 0.0
        self.reward_mean = torch.zeros(3, dtype=torch.float64)
        self.reward_var = torch.zeros(3, dtype=torch.float64)
        self.mean_answer = torch.zeros(num_classes, dtype=torch.float64)
        self.cursor = torch.zeros(arms, dtype=torch.long)
        self.orders = [m[torch.randperm(len(m), generator=self.generator)] for m in self.members]
        self._arms: Tensor | None = None

    def draw(self, start: int, count: int) -> Tensor:
        pi = self.h.softmax(dim=0)
        self._arms = torch.multinomial(pi, count, replacement=True, generator=self.generator)
        chosen = []
        for arm in self._arms.tolist():
            order = self.orders[arm]
            chosen.append(order[self.cursor[arm] % len(order)])
            self.cursor[arm] += 1
        return torch.stack(chosen)

    def update(self, x: Tensor, answers: Tensor) -> None:
        self.policy.eval()
        with torch.no_grad():
            log_probs = self.policy(x).log_softmax(dim=-1)
        self.policy.train()
        self.optimizer.zero_grad()
        clone_loss(self.policy(x), answers).backward()
        self.optimizer.step()
        y = answers.double()
        top2 = y.topk(2, dim=-1).values
        certainty = (top2[:, 0] - top2[:, 1]).tolist()
        loss = (-(y * log_probs.double()).sum(dim=-1)).tolist()
        for i, arm in enumerate(self._arms.tolist()):
            self.seen += 1
            self.mean_answer += (y[i] - self.mean_answer) / min(self.seen, self.window)
            diversity = float((y[i] - self.mean_answer).clamp(min=0).sum())
            reward = self._combine(torch.tensor([certainty[i], diversity, loss[i]], dtype=torch.float64))
            self.mean_reward += (reward - self.mean_reward) / self.seen
            self.pulls[arm] += 1
            pi = self.h.softmax(dim=0)
            step = (reward - self.mean_reward) / self.pulls[arm]
            self.h -= step * pi
            self.h[arm] += step

    def _combine(self, rewards: Tensor) -> float:
        if self.reward != "all":
            return float(rewards[("cert", "div", "loss").index(self.reward)])
        n = self.seen
        self.reward_mean += (rewards - self.reward_mean) / n
        self.reward_var += ((rewards - self.reward_mean) ** 2 - self.reward_var) / n
        if n == 1:
            return float(rewards.clamp(0, 1).mean())
        return float(((rewards - self.reward_mean) / self.reward_var.sqrt().clamp(min=1e-12)).mean())

    def state_dict(self) -> dict:
        keys = ("h", "pulls", "seen", "mean_reward", "reward_mean", "reward_var", "mean_answer", "cursor", "orders")
        state = {key: getattr(self, key) for key in keys}
        state.update(policy=self.policy.state_dict(), optimizer=self.optimizer.state_dict(),
                     generator=self.generator.get_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key == "policy":
                self.policy.load_state_dict(value)
            elif key == "optimizer":
                self.optimizer.load_state_dict(value)
            elif key == "generator":
                self.generator.set_state(value)
            else:
                setattr(self, key, value)
