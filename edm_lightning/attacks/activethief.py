"""ActiveThief (Pal et al., AAAI 2020): the budget spent in rounds, each choosing its queries with the clone so far.

The attacker holds an unlabelled pool of natural images (the surrogate, as KnockoffNets). Round 0 buys the
victim's answers on ``initial_size`` random pool images; the clone trains ``epochs_per_round`` epochs on what was
bought; then each of ``rounds`` rounds selects the next ``round_size`` pool images not yet bought, with the
current clone, and buys their answers (paper Sec. 3, Algorithm 1). Selection strategies (paper Sec. 3.2):

* ``uncertainty``: the images whose clone prediction has the highest entropy (the clone is least sure of them);
* ``kcenter``: greedy k-center on the clone's probability vectors (the core-set of Sener and Savarese, 2018): each
  pick is the pool image farthest from every image bought or picked so far, so the bought set covers the pool;
* ``random``: uniform, the baseline (KnockoffNets' random strategy spread over rounds).

Paper setting: an initial random seed of 10% of the budget, 10 rounds. Each round's images and answers are
kept under a :class:`~edm_lightning.attacks.purchase.Purchase`, so a re-run reads them back (charged, bought
once) and a kill after the victim answered never takes the attack past its budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.purchase import Purchase
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.rounds import RoundsCloneModule
from edm_lightning.attacks.run import AttackJob, require_single_process
from edm_lightning.data.images import BatchTensorDataset
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.files import save_atomic
from edm_lightning.optim import OptimConfig

__all__ = ["ActiveThiefDataModule", "ActiveThiefModule", "activethief_cost", "activethief_job", "check_rounds",
           "entropy_selection", "kcenter_selection"]

Strategy = Literal["uncertainty", "kcenter", "random"]
STRATEGIES = ("uncertainty", "kcenter", "random")


def entropy_selection(probs: Tensor, count: int) -> Tensor:
    """The ``count`` rows of ``probs`` ``(N, K)`` with the highest prediction entropy (ActiveThief's uncertainty).

    Returns:
        Row indices ``(count,)``, most uncertain first.

    Example:
        >>> probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
        >>> entropy_selection(probs, 2)
        tensor([1, 2])
    """
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.topk(min(count, len(probs))).indices


def kcenter_selection(candidates: Tensor, centres: Tensor, count: int, block: int = 8192) -> Tensor:
    """Greedy k-center: ``count`` rows of ``candidates`` ``(N, D)``, each the one farthest (Euclidean) from ``centres``
    ``(M, D)`` and from every row picked before it (Sener and Savarese, ICLR 2018; ActiveThief's k-center).

    With no centres, the first pick is the row farthest from the candidates' mean.

    Returns:
        Row indices ``(count,)``, in the order picked.

    Example:
        >>> pool = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 4.0]])
        >>> kcenter_selection(pool, centres=torch.tensor([[0.0, 0.0]]), count=2)
        tensor([2, 3])
    """
    count = min(count, len(candidates))
    if len(centres):
        nearest = torch.cat([torch.cdist(part, centres).min(dim=1).values for part in candidates.split(block)])
    else:
        nearest = torch.cdist(candidates, candidates.mean(dim=0, keepdim=True)).squeeze(1)
    picked = []
    for _ in range(count):
        index = int(nearest.argmax())
        picked.append(index)
        nearest = torch.minimum(nearest, (candidates - candidates[index]).norm(dim=1))
        nearest[index] = -1.0  # never picked twice
    return torch.tensor(picked, dtype=torch.long)


class ActiveThiefModule(RoundsCloneModule):
    """The ActiveThief attacker: a clone that chooses its next queries every ``epochs_per_round`` epochs.

    Training runs ``(rounds + 1) * epochs_per_round`` epochs: after each round's epochs (except the last) the
    clone selects the next pool images by ``strategy`` and ``trainer.datamodule`` (an
    :class:`ActiveThiefDataModule`) buys their answers. The clone's accuracy at the end of every round is logged
    (``activethief/round_acc``) and kept in ``history``.

    Args:
        arch, num_classes, input_shape, mean, std, optim: see :class:`~edm_lightning.models.CloneModule`.
        strategy: ``uncertainty`` (entropy), ``kcenter`` (core-set coverage) or ``random``.
        rounds: selection rounds after the initial random seed.
        epochs_per_round: clone training epochs on each round's set.
    """

    attack_name = "ActiveThief"

    def __init__(
        self,
        arch: str = "lenet5",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
        strategy: Strategy = "kcenter",
        rounds: int = 10,
        epochs_per_round: int = 10,
    ):
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown selection strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be an integer >= 1 (selection rounds after the random seed), got {rounds!r}")
        if isinstance(epochs_per_round, bool) or not isinstance(epochs_per_round, int) or epochs_per_round < 1:
            raise ConfigError(f"epochs_per_round must be an integer >= 1, got {epochs_per_round!r}")
        super().__init__(arch, num_classes, input_shape, mean, std, optim)
        self.save_hyperparameters()
        self.history: list[dict[str, float]] = []

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        rounds = self.trainer.datamodule.hparams.rounds
        if rounds != self.hparams.rounds:
            raise ConfigError(f"the clone runs {self.hparams.rounds} rounds but the DataModule splits the budget into "
                              f"{rounds}: set the same rounds in model and data")

    def datamodule_type(self) -> type[ActiveThiefDataModule]:
        """The DataModule of the pool and what was bought from it (:class:`ActiveThiefDataModule`)."""
        return ActiveThiefDataModule

    def buy_round(self, round_: int, datamodule: ActiveThiefDataModule) -> None:
        """Round ``round_``: the pool images :meth:`select` picks with the clone as it is now, answered by the victim."""
        random = self.hparams.strategy == "random"  # the DataModule's own random picks, as for round 0
        datamodule.buy_round(round_, None if random else self.select, tag=self._tag())

    def sizes(self, datamodule: ActiveThiefDataModule) -> dict[str, int]:
        """Pool images bought and queries spent so far (a batch lost to a kill is a query without an image)."""
        return {"images": datamodule.bought, "queries": datamodule.queries_spent}

    def select(self, pool: Tensor, bought: Tensor, count: int, generator: torch.Generator) -> Tensor:
        """Positions in ``pool`` ``(N, C, H, W)`` of the next ``count`` queries, given the images ``bought`` so far, by
        entropy (``uncertainty``) or k-center coverage (``kcenter``); ``random`` picks are the DataModule's own.

        Returns:
            Indices into ``pool`` ``(count,)``.
        """
        probs = self._probabilities(pool)
        if self.hparams.strategy == "uncertainty":
            return entropy_selection(probs, count)
        return kcenter_selection(probs, self._probabilities(bought), count)

    def figures(self) -> dict[str, Any]:
        """The attack's name (with its strategy) and its per-round history (queries, clone accuracy)."""
        return {"attack": f"activethief-{self.hparams.strategy}", "rounds": self.history}

    @torch.no_grad()
    def _probabilities(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        was_training = self.net.training
        self.net.eval()
        probs = torch.cat([self.net(part.to(self.device)).softmax(dim=-1).cpu() for part in x.split(batch_size)]) \
            if len(x) else x.new_zeros((0, self.hparams.num_classes))
        self.net.train(was_training)
        return probs

    def _tag(self) -> str:
        hp = self.hparams
        return repr((hp.arch, hp.strategy, hp.epochs_per_round, self.optim))


class ActiveThiefDataModule(AttackDataModule):
    """The attacker's unlabelled pool and the transfer set bought from it, round by round.

    Args:
        victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed:
            see :class:`~edm_lightning.attacks.AttackDataModule`; ``budget`` is every round's queries together.
        surrogate: registry name of the pool's natural images (converted to the victim's shape).
        initial_size: random pool images bought first (default: 10% of the budget, the paper's).
        rounds: selection rounds after them; each buys ``(budget - initial_size) // rounds`` images (the last the rest).
    """

    def __init__(
        self,
        victim: VictimConfig | RemoteVictimConfig,
        dataset: str = "fashionmnist",
        surrogate: str = "mnist",
        budget: int = 20_000,
        initial_size: int | None = None,
        rounds: int = 10,
        label_only: bool = False,
        root: str = "data",
        batch_size: int = 128,
        test_size: int | None = None,
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
    ):
        initial = check_rounds(budget, {"initial_size": initial_size, "rounds": rounds})
        if surrogate == dataset:
            raise ConfigError(f"the surrogate pool must not be the victim's own dataset {dataset!r}: ActiveThief's attacker "
                              "holds natural images of another task (mnist, cifar100)")
        super().__init__(victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed)
        self.save_hyperparameters(ignore=["victim"])
        self.initial_size = initial
        self.load_attacker_images(surrogate, train=True, check_only=True)  # shape convertibility, before any query
        self._pool: Tensor | None = None
        self.chosen: Tensor = torch.empty(0, dtype=torch.long)  # pool positions bought, in order
        self.answers: Tensor | None = None

    @property
    def bought(self) -> int:
        """Pool images whose answers the transfer set holds."""
        return len(self.chosen)

    def round_size(self, round_: int) -> int:
        """Images round ``round_`` buys: ``initial_size`` for round 0, an equal share of the rest after it."""
        if round_ == 0:
            return self.initial_size
        share, rest = divmod(self.hparams.budget - self.initial_size, self.hparams.rounds)
        return share + (rest if round_ == self.hparams.rounds else 0)

    @override
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.answers is None:
            if self.trainer is not None:
                require_single_process(self.trainer, "ActiveThief")  # before round 0 is bought, not after
            self.buy_round(0, None, tag="seed")

    @override
    def train_dataloader(self):
        self.train_set = BatchTensorDataset(self.pool[self.chosen], self.answers)
        return super().train_dataloader()

    @property
    def pool(self) -> Tensor:
        """The surrogate pool's images in [0, 1], ``(N, *input_shape)``."""
        if self._pool is None:
            images, _ = self.load_attacker_images(self.hparams.surrogate, train=True)
            self._pool = images.float().div_(255)
        return self._pool

    def buy_round(self, round_: int, select, tag: str) -> int:
        """Buy round ``round_``: the pool images ``select(pool, bought_images, count, generator)`` picks among those not
        yet bought (``None``: at random), answered by the victim, kept in the round's file.

        A round an earlier run bought (wholly or in part) is read back and only its missing answers are bought; a
        batch the victim may have answered before a kill is charged (kept as ``lost``). Once this run has queried,
        later cached rounds are stale (another clone chose them) and are bought afresh.

        Returns:
            The number of images added.
        """
        path = self._round_path(round_, tag)
        with Purchase(path) as purchase:
            lost, fresh = 0, not (path.is_file() and self._oracle is None)
            if not fresh:
                chosen, answers, lost = self.read_round(path, "chosen", self._picks_problem)
                chosen = chosen.long()
                self._prepaid += len(answers) + lost
            else:
                generator = torch.Generator().manual_seed(self.hparams.seed * 1000 + round_)
                left = torch.ones(len(self.pool), dtype=torch.bool)
                left[self.chosen] = False
                candidates = left.nonzero(as_tuple=True)[0]
                count = min(self.round_size(round_), len(candidates))
                if select is None:
                    picked = torch.randperm(len(candidates), generator=generator)[:count]
                else:
                    picked = select(self.pool[candidates], self.pool[self.chosen], count, generator)
                chosen, answers = candidates[picked], self.pool.new_zeros((0, self.num_classes))
            pending = purchase.take_pending()
            if pending is not None:  # a run was killed between the victim's answer and the save: charge it, keep it
                lost += pending["queries"]
                self.charge_lost(pending["queries"])
                save_atomic({"chosen": chosen, "answers": answers, "lost": lost}, path)
                purchase.settle()
            if fresh:
                remaining = self.oracle.remaining
                chosen = chosen[: max(0, remaining)] if remaining is not None else chosen
            elif len(chosen) > len(answers) + self.hparams.budget - self.queries_spent:  # a charged kill took the rest
                chosen = chosen[: len(answers) + max(0, self.hparams.budget - self.queries_spent)]
                save_atomic({"chosen": chosen, "answers": answers, "lost": lost}, path)
            answers = purchase.complete(lambda: self.oracle, self.pool[chosen], answers, self.hparams.batch_size,
                                        lambda bought: save_atomic({"chosen": chosen, "answers": bought, "lost": lost}, path))
        self.chosen = torch.cat([self.chosen, chosen])
        self.answers = answers if self.answers is None else torch.cat([self.answers, answers])
        return len(chosen)

    def _picks_problem(self, chosen: object) -> str | None:
        """What is wrong with a round's pool picks read back (``None``: distinct positions in the pool)."""
        if not isinstance(chosen, Tensor) or chosen.ndim != 1 or chosen.is_floating_point() or chosen.dtype == torch.bool:
            return "its picks are not a vector of pool positions"
        if len(chosen) and (int(chosen.min()) < 0 or int(chosen.max()) >= len(self.pool)):
            return f"its picks are not positions in the pool of {len(self.pool)} images"
        if len(chosen.unique()) != len(chosen):
            return "its picks repeat pool images"
        return None

    def figures(self) -> dict[str, Any]:
        """The pool, the initial random seed and the transfer set's final size."""
        return {"surrogate": self.hparams.surrogate, "initial_size": self.initial_size, "transfer_set": self.bought}

    def _round_path(self, round_: int, tag: str) -> Path:
        key = self.cache_key(attack="activethief", surrogate=self.hparams.surrogate, initial_size=self.initial_size,
                             rounds=self.hparams.rounds, tag=tag if round_ else "seed")
        return self.cache_dir / f"activethief-{key}-round{round_}.pt"


def check_rounds(budget: int, options: Mapping[str, Any]) -> int:
    """Refuse a budget the rounds cannot split: ``initial_size`` (default 10% of ``budget``) and ``rounds`` from
    ``options``. The DataModule and a runner (before its first stage) call it alike.

    Returns:
        The initial random seed's size.

    Raises:
        ConfigError: ``rounds`` not an integer >= 1, ``initial_size`` outside [1, budget), or too little budget left
            for one image per round.
    """
    rounds, initial = options.get("rounds", 10), options.get("initial_size")
    initial = initial if initial is not None else max(1, budget // 10)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1 (selection rounds after the random seed), got {rounds!r}")
    if isinstance(initial, bool) or not isinstance(initial, int) or not 0 < initial < budget:
        raise ConfigError(f"initial_size must be an integer in [1, budget) (random pool images bought first), got "
                          f"{initial!r} for budget={budget}")
    if (budget - initial) // rounds < 1:
        raise ConfigError(f"budget={budget} leaves {budget - initial} queries after initial_size={initial}: too few for "
                          f"{rounds} rounds of at least one image each; raise the budget or lower rounds")
    return initial


def activethief_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: the queries, a clone trained ``epochs`` per round on a set growing to ``budget``
    (about ``rounds / 2`` times the budget's images per epoch), and each round's pass over the pool.

    Returns:
        The estimate, in seconds.
    """
    rounds = int(options.get("rounds", 10))
    return budget * SECONDS_PER_QUERY + epochs * budget * seconds_per_image_epoch * (rounds + 2) / 2 + 2.0 * rounds


@register_attack("activethief", surrogate_pool=True, queries_in_training=True, epochs_argument="epochs_per_round",
                 cost=activethief_cost, check=check_rounds)
def activethief_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    surrogate: str = "mnist",
    strategy: Strategy = "kcenter",
    budget: int = 20_000,
    initial_size: int | None = None,
    rounds: int = 10,
    epochs_per_round: int = 10,
    label_only: bool = False,
    arch: str = "lenet5",
    optim: OptimConfig | None = None,
    batch_size: int = 128,
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
) -> AttackJob:
    """ActiveThief as a job: what ``python main.py fit --config configs/attack/activethief.yaml`` builds; from Python,
    ``ATTACKS.get("activethief").run(victim, budget=5000, ...)``. The Trainer runs ``(rounds + 1) * epochs_per_round``
    epochs.

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`).
    """
    data_args = dict(victim=victim, dataset=dataset, surrogate=surrogate, budget=budget, initial_size=initial_size,
                     rounds=rounds, label_only=label_only, root=root, batch_size=batch_size, test_size=test_size,
                     cache_dir=cache_dir, seed=seed)
    module_args = dict(arch=arch, optim=optim or OptimConfig(name="adam", lr=1e-3, schedule="constant"), strategy=strategy,
                       rounds=rounds, epochs_per_round=epochs_per_round)
    return AttackJob(ActiveThiefModule, module_args, ActiveThiefDataModule, data_args, (rounds + 1) * epochs_per_round, seed)
