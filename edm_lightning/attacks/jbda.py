"""JBDA (Papernot et al., AsiaCCS 2017) and JBDA-TR (Juuti et al., EuroS&P 2019): Jacobian-based augmentation.

The attacker holds a small in-distribution seed set (150 images in the literature), has the victim
label it, trains a substitute (the clone), and then for T rounds doubles the set: every point
``x`` gets a sibling ``clip(x + epsilon * sign(grad_x s(x)), 0, 1)`` that the victim labels next.

* JBDA: ``s`` is the clone's logit of the class the victim gave ``x`` (Papernot's ``J_F[O(x)]``):
  the step probes where the clone's output changes fastest, i.e. near its decision boundary.
* JBDA-TR (the targeted "T-RND" variant of PRADA, also used by Adaptive Misinformation): ``s`` is the
  clone's log-probability of a random *other* class, so each sibling moves towards a random target.

Literature setting: 150 seed images, 6 rounds, epsilon 0.1 (9,600 queries in all). The clone keeps training
across rounds (warm start) for ``epochs_per_round`` epochs on the current set. Each round's new
points and answers are saved, so a killed run resumes without buying a round twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.purchase import Purchase
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.rounds import RoundsCloneModule
from edm_lightning.attacks.run import AttackJob, require_single_process
from edm_lightning.data.datamodules import seeded_indices
from edm_lightning.data.images import BatchTensorDataset
from edm_lightning.data.perturbations import jacobian_augmentation
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.files import save_atomic
from edm_lightning.optim import OptimConfig

__all__ = ["JBDADataModule", "JBDAModule", "jacobian_augmentation", "jbda_cost", "jbda_job", "run_jbda"]


class JBDAModule(RoundsCloneModule):
    """The JBDA / JBDA-TR attacker: a clone that grows its own training set every ``epochs_per_round``.

    Training runs ``(rounds + 1) * epochs_per_round`` epochs: after each round's epochs (except the
    last) the substitute set is augmented through ``trainer.datamodule`` (a :class:`JBDADataModule`),
    which buys the victim's answers for the new points. The clone's accuracy and agreement at the
    end of every round are logged (``jbda/round_acc``) and kept in ``history``.

    Args:
        arch, num_classes, input_shape, mean, std, optim: see :class:`CloneModule`.
        rounds: augmentation rounds T.
        epochs_per_round: clone training epochs on each round's set.
        epsilon: step size of the augmentation (images in [0, 1]).
        targeted: JBDA-TR (steps towards a random target class) instead of JBDA.
    """

    attack_name = "JBDA"

    def __init__(
        self,
        arch: str = "lenet5",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
        rounds: int = 6,
        epochs_per_round: int = 10,
        epsilon: float = 0.1,
        targeted: bool = False,
    ):
        if rounds < 0 or epochs_per_round <= 0 or not 0 < epsilon <= 1:
            raise ConfigError(
                f"need rounds >= 0, epochs_per_round > 0 and epsilon in (0, 1]; got {rounds}, {epochs_per_round}, {epsilon}"
            )
        super().__init__(arch, num_classes, input_shape, mean, std, optim)
        self.save_hyperparameters()
        self.history: list[dict[str, float]] = []

    def datamodule_type(self) -> type[JBDADataModule]:
        """The DataModule of the substitute set (:class:`JBDADataModule`)."""
        return JBDADataModule

    def buy_round(self, round_: int, datamodule: JBDADataModule) -> None:
        """Round ``round_``: a Jacobian step from every point bought so far, answered by the victim."""
        datamodule.augment(round_, self._siblings, tag=self._tag())

    def sizes(self, datamodule: JBDADataModule) -> dict[str, int]:
        """The substitute set's size: one query per point."""
        return {"queries": len(datamodule.substitute_x)}

    def figures(self) -> dict[str, Any]:
        """The attack's name and its per-round history (substitute set size, clone accuracy)."""
        return {"attack": "jbda-tr" if self.hparams.targeted else "jbda", "rounds": self.history}

    def _siblings(self, x: Tensor, answers: Tensor, generator: torch.Generator) -> Tensor:
        labels = answers.argmax(dim=-1)
        targets = None
        if self.hparams.targeted:
            offset = torch.randint(1, self.hparams.num_classes, labels.shape, generator=generator)
            targets = (labels + offset) % self.hparams.num_classes  # a random class other than the victim's
        return jacobian_augmentation(self.net, x, labels, self.hparams.epsilon, targets)

    def _tag(self) -> str:
        hp = self.hparams
        return repr((hp.arch, hp.epochs_per_round, hp.epsilon, hp.targeted, self.optim))


class JBDADataModule(AttackDataModule):
    """The attacker's seed set and growing substitute set, bought through the oracle.

    Args:
        victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed:
            see :class:`~edm_lightning.attacks.AttackDataModule`.
        seed_size: in-distribution images the attacker starts from (drawn from the victim dataset's
            training split, which the victim's test-set evaluation never touches).
    """

    def __init__(
        self,
        victim: VictimConfig | RemoteVictimConfig,
        dataset: str = "fashionmnist",
        seed_size: int = 150,
        budget: int = 9_600,
        label_only: bool = False,
        root: str = "data",
        batch_size: int = 128,
        test_size: int | None = None,
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
    ):
        if seed_size <= 0:
            raise ConfigError(f"seed_size must be positive, got {seed_size}")
        if seed_size > budget:
            raise ConfigError(f"seed_size={seed_size} exceeds the budget={budget}: the seed set alone could not be labelled")
        super().__init__(victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed)
        self.save_hyperparameters(ignore=["victim"])
        self.substitute_x: Tensor | None = None
        self.substitute_y: Tensor | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.substitute_x is None:
            if self.trainer is not None:
                require_single_process(self.trainer, "JBDA")  # before the seed set is bought, not after
            self.augment(0, self._seed_set, tag="seed")

    @override
    def train_dataloader(self):
        self.train_set = BatchTensorDataset(self.substitute_x, self.substitute_y)
        return super().train_dataloader()

    def augment(self, round_: int, make_points: Callable[..., Tensor], tag: str) -> int:
        """Add round ``round_``'s points (made by ``make_points(x, answers, generator)``) with the victim's answers.

        The round's points and answers are saved after every query batch, under a
        :class:`~edm_lightning.attacks.purchase.Purchase` (a batch the victim may have answered before a kill is
        charged to the next run and kept in the round's file as ``lost``). A round an earlier run of the same
        attack bought (wholly or in part) is read back and only its missing answers are bought; what was read
        counts against the budget all the same. Once this run has queried, later cached rounds are stale (they
        grew from other points) and are bought afresh. When the budget cannot pay for a whole round, a random
        part of it is bought.

        Returns:
            The number of points added this round.
        """
        path = self._round_path(round_, tag)
        with Purchase(path) as purchase:
            lost, fresh = 0, not (path.is_file() and self._oracle is None)
            if not fresh:
                x, answers, lost = self.read_round(path, "x", self._points_problem)
                self._prepaid += len(answers) + lost
            else:
                generator = torch.Generator().manual_seed(self.hparams.seed * 1000 + round_)
                x = make_points(self.substitute_x, self.substitute_y, generator) if round_ else make_points()
                answers = x.new_zeros((0, self.num_classes))
            pending = purchase.take_pending()
            if pending is not None:  # a run was killed between the victim's answer and the save: charge it, keep it
                lost += pending["queries"]
                self.charge_lost(pending["queries"])
                save_atomic({"x": x, "answers": answers, "lost": lost}, path)
                purchase.settle()
            if fresh:
                remaining = self.oracle.remaining
                if remaining is not None and remaining < len(x):
                    x = x[torch.randperm(len(x), generator=generator)[:remaining]]
            elif len(x) > len(answers) + self.hparams.budget - self.queries_spent:  # a charged kill took what the rest needed
                x = x[: len(answers) + max(0, self.hparams.budget - self.queries_spent)]
                save_atomic({"x": x, "answers": answers, "lost": lost}, path)
            answers = purchase.complete(lambda: self.oracle, x, answers, self.hparams.batch_size,
                                        lambda bought: save_atomic({"x": x, "answers": bought, "lost": lost}, path))
        if self.substitute_x is None:
            self.substitute_x, self.substitute_y = x, answers
        else:
            self.substitute_x = torch.cat([self.substitute_x, x])
            self.substitute_y = torch.cat([self.substitute_y, answers])
        return len(x)

    def _points_problem(self, x: object) -> str | None:
        """What is wrong with a round's points read back (``None``: they are images of the victim's shape in [0, 1])."""
        shape = (len(x), *self.input_shape) if isinstance(x, Tensor) and x.ndim else None
        if shape is None or tuple(x.shape) != shape or not x.is_floating_point():
            return f"its points are not floating-point images of shape (N, {', '.join(map(str, self.input_shape))})"
        if len(x) and not (x.isfinite().all() and x.min() >= 0 and x.max() <= 1):
            return "its points are not images in [0, 1]"
        return None

    def figures(self) -> dict[str, Any]:
        """Seed images and the final substitute set's size."""
        return {"seed_size": self.hparams.seed_size, "train_size": 0 if self.substitute_x is None else len(self.substitute_x)}

    def _round_path(self, round_: int, tag: str) -> Path:
        key = self.cache_key(attack="jbda", dataset=self.hparams.dataset, seed_size=self.hparams.seed_size,
                             tag=tag if round_ else "seed")
        return self.cache_dir / f"jbda-{key}-round{round_}.pt"

    def _seed_set(self) -> Tensor:
        images, _ = self.load_attacker_images(self.hparams.dataset, train=True)
        _, keep = seeded_indices(len(images), 0, self.hparams.seed_size, self.hparams.seed)
        return images[keep].float().div_(255)


def jbda_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: the rounds' queries and Jacobian steps, and a clone trained ``epochs`` per round.

    Returns:
        The estimate, in seconds.
    """
    return budget * SECONDS_PER_QUERY * 10 + epochs * budget * seconds_per_image_epoch * 6


@register_attack("jbda_tr", fixed={"targeted": True}, epochs_argument="epochs_per_round", queries_in_training=True,
                 cost=jbda_cost)
@register_attack("jbda", fixed={"targeted": False}, epochs_argument="epochs_per_round", queries_in_training=True,
                 cost=jbda_cost)
def jbda_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    targeted: bool = False,
    seed_size: int = 150,
    rounds: int = 6,
    epochs_per_round: int = 10,
    epsilon: float = 0.1,
    budget: int | None = None,
    label_only: bool = False,
    arch: str = "lenet5",
    optim: OptimConfig | None = None,
    batch_size: int = 128,
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
) -> AttackJob:
    """JBDA (``targeted=False``) or JBDA-TR as a job: what ``python main.py fit --config configs/attack/jbda.yaml`` builds.

    ``budget`` defaults to ``seed_size * 2**rounds``; the Trainer runs ``(rounds + 1) * epochs_per_round`` epochs.

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`).
    """
    data_args = dict(victim=victim, dataset=dataset, seed_size=seed_size, budget=budget or seed_size * 2**rounds,
                     label_only=label_only, root=root, batch_size=batch_size, test_size=test_size, cache_dir=cache_dir,
                     seed=seed)
    module_args = dict(arch=arch, optim=optim or OptimConfig(name="adam", lr=1e-3, schedule="constant"), rounds=rounds,
                       epochs_per_round=epochs_per_round, epsilon=epsilon, targeted=targeted)
    return AttackJob(JBDAModule, module_args, JBDADataModule, data_args, (rounds + 1) * epochs_per_round, seed)


def run_jbda(victim: VictimConfig | RemoteVictimConfig, *, trainer: dict[str, Any] | None = None,
             **settings: Any) -> dict[str, Any]:
    """JBDA or JBDA-TR end to end from Python.

    Args:
        victim: the victim to steal from.
        trainer: Trainer arguments (``accelerator``, ``devices``, ``precision``, ``logger``, ...).
        settings: :func:`jbda_job`'s arguments (``targeted``, ``rounds``, ``seed_size`` ...).

    Returns:
        The figures of :func:`~edm_lightning.attacks.run_attack` plus the attack's own (rounds).
    """
    return jbda_job(victim, **settings).run(trainer)
