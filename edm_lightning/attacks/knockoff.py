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

The transfer set (:mod:`~edm_lightning.attacks.transfer_set`: surrogate indices and answers, plus the
sampler's state, :mod:`~edm_lightning.attacks.samplers`) is kept on disk after every query batch. A re-run
buys only what is missing; a run with a smaller budget reuses a prefix (the sampling order does not depend
on B), so budget curves cost the largest budget once. A killed run resumes from the last saved batch.

Query averaging (an adaptive attack on EDM): with ``query_copies = K`` each surrogate image is sent as K
copies with faint Gaussian noise (``copy_noise``, std in [0, 1] pixel units, clamped to [0, 1]) and the
clone trains on the mean answer. Against a router that scatters near-identical inputs over members
(a keyed byte hash), the mean approaches the ensemble's average, which EDM's members were trained to
keep accurate only in distribution; a neural hash sends the copies to one member and the mean buys
nothing. An attacker who knows the router is a neural hash (but not its weights) knows faint noise will
not move a query to another member and shifts each copy by up to ``copy_shift`` pixels instead, which
changes what the hash network sees far more. The budget counts every copy (the oracle counts rows): a
budget B buys B // K images, K times the queries per transfer-set item, and the report says so.

A stronger attacker reshapes its pool before querying (``pool_transform: dilate-affine``,
:func:`~edm_lightning.data.perturbations.dilate_affine`): each surrogate image is thickened and moved at random
once, from the attacker's seed, and that image is what is queried and what the clone trains on. MNIST digits
then reach more of a FashionMNIST victim's classes (README, "A stronger KnockoffNets").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from torch import Tensor
from typing_extensions import override

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.oracle import BlackBoxOracle
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob
from edm_lightning.attacks.transfer_set import Reward, Strategy, TransferSet, build_transfer_set, check_budget_buys_an_image
from edm_lightning.data.images import BatchTensorDataset
from edm_lightning.data.perturbations import check_copies, check_pool_transform, dilate_affine
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models.clone import CloneModule
from edm_lightning.models.mixture_clone import MixtureCloneModule
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig

__all__ = ["KnockoffDataModule", "knockoff_cost", "knockoff_job", "run_knockoff"]


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
        pool_transform: what the attacker does to its pool before querying: ``none``, or ``dilate-affine``
            (each image thickened and moved at random, drawn from ``seed``).
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
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
        pool_transform: str = "none",
    ):
        if strategy not in ("random", "adaptive"):
            raise ConfigError(f"unknown strategy {strategy!r}: expected 'random' or 'adaptive'")
        if reward not in ("cert", "div", "loss", "all"):
            raise ConfigError(f"unknown reward {reward!r}: expected 'cert', 'div', 'loss' or 'all'")
        if not (0 < diversity_window < math.inf and 0 < policy_lr < math.inf):  # NaN fails too
            raise ConfigError(f"diversity_window and policy_lr must be finite and positive, got {diversity_window!r} "
                              f"and {policy_lr!r}")
        if isinstance(query_batch_size, bool) or not isinstance(query_batch_size, int) or query_batch_size < 1:
            raise ConfigError(f"query_batch_size must be a positive integer (queries per oracle call), got {query_batch_size!r}")
        check_copies(query_copies, copy_noise, copy_shift)
        check_pool_transform(pool_transform)
        self.pool_transform = pool_transform  # an attribute: subclasses (D-DAE, FixMatch) save their own hyper-parameters
        check_budget_buys_an_image(budget, query_copies)
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
        if self.pool_transform != "none":
            attack.update(pool_transform=self.pool_transform)
        return self.cache_dir / f"knockoff-{self.cache_key(**attack)}.pt"

    @override
    def client_key(self) -> str:
        """The transfer set's name: every attack reading this purchase (any budget, clone or restorer) is its client."""
        return self.cache_path.stem

    @override
    def prepare_data(self) -> None:
        if self.transfer is None:
            self.transfer = self.buy_transfer_set(self.open_oracle, self.hparams.budget)

    def buy_transfer_set(self, open_oracle: Callable[[int], BlackBoxOracle], budget: int) -> TransferSet:
        """The transfer set of ``budget`` queries with this DataModule's sampling settings, in :attr:`cache_path`:
        read back, completed or bought (:func:`~edm_lightning.attacks.transfer_set.build_transfer_set`, which calls
        ``open_oracle(queries already spent)`` before its first query).

        Returns:
            The transfer set.
        """
        images, labels = self._surrogate_images()
        hp = self.hparams
        policy = None
        if hp.strategy == "adaptive":
            policy = build_net(hp.policy_arch, self.input_shape, self.num_classes, self.mean, self.std)
        return build_transfer_set(
            open_oracle, images, labels, budget, self.cache_path, strategy=hp.strategy, reward=hp.reward,
            batch_size=hp.batch_size, seed=hp.seed, policy=policy, policy_lr=hp.policy_lr,
            diversity_window=hp.diversity_window, query_copies=hp.query_copies, copy_noise=hp.copy_noise,
            copy_shift=hp.copy_shift, query_batch_size=hp.query_batch_size,
        )

    @override
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.train_set is None:
            images, _ = self._surrogate_images()
            if self.transfer is None:  # another process bought it (DDP): read it back, as rank 0 left it
                with FileLock(self.cache_path.with_name(self.cache_path.name + ".lock")):
                    bought = TransferSet.load(self.cache_path)
                bought.check_fits(self.cache_path, self.num_classes, len(images))
                items = bought.items_within(self.hparams.budget)
                self.transfer = bought.head(items)
                if len(self.transfer) < items:
                    raise RuntimeError(f"transfer set {self.cache_path} holds {len(self.transfer)} of {items} images")
            x = images[self.transfer.indices].float().div_(255)
            self.train_set = BatchTensorDataset(x, self.transfer.answers)

    def figures(self) -> dict[str, Any]:
        """The attack's name (strategy, averaging) and the transfer set's size in items and queries."""
        hp = self.hparams
        items = len(self.transfer or ())
        return {"attack": f"knockoff-{hp.strategy}" + (f"-avg{hp.query_copies}" if hp.query_copies > 1 else "")
                + (f"-{self.pool_transform}" if self.pool_transform != "none" else ""),
                "surrogate": hp.surrogate, "transfer_set": items, "query_copies": hp.query_copies,
                "copy_noise": float(hp.copy_noise), "copy_shift": hp.copy_shift, "queries_per_item": hp.query_copies,
                "extra_queries": items * (hp.query_copies - 1), "pool_transform": self.pool_transform,
                "lost_queries": self.transfer.charged(items) if self.transfer else 0}

    def _surrogate_images(self) -> tuple[Tensor, Tensor]:
        if self._surrogate is None:
            images, labels = self.load_attacker_images(self.hparams.surrogate, train=True)
            if self.pool_transform == "dilate-affine":
                images = dilate_affine(images, self.hparams.seed)
            self._surrogate = images, labels
        return self._surrogate


def knockoff_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: buying ``budget`` queries, then ``epochs`` epochs on ``budget // query_copies`` items.

    Returns:
        The estimate, in seconds.
    """
    items = budget // int(options.get("query_copies", 1))
    return budget * SECONDS_PER_QUERY + epochs * items * seconds_per_image_epoch + 3.0


@register_attack("knockoff", forwards_to=KnockoffDataModule, surrogate_pool=True, shares_purchase=True, cost=knockoff_cost)
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
    cache_dir: str = CACHE_DIR,
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
    ``copy_shift``, ``pool_transform`` ...). ``clone_heads > 1`` trains a :class:`~edm_lightning.models.MixtureCloneModule`
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
