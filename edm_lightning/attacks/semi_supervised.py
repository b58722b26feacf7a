"""KnockoffNets with a semi-supervised clone (FixMatch, Sohn et al., NeurIPS 2020; ModelGuard's S4L attacker).

The attacker buys exactly KnockoffNets' transfer set (the same surrogate images, the same answers: the same
victim, seed, surrogate and sampling share one purchase with plain KnockoffNets) and then also learns from the
rest of its pool, the surrogate images it did not buy, which are never queried: the clone
(:class:`~edm_lightning.models.SemiSupervisedCloneModule`) adds FixMatch's consistency loss on them (paper Eq. 4).
The fewer queries bought, the more of the pool is left unlabelled: the attack matters most at small budgets.

Each training step pairs a batch of ``B`` bought images with ``mu * B`` unlabelled ones. An epoch is one pass over
the bought images (as KnockoffNets' epoch, so equal epochs mean equal labelled steps); the unlabelled images are
reshuffled every epoch, each repeated equally often when an epoch needs more of them than the pool holds. Nothing
is queried during training, so DDP is fine: each process trains on its own share of both sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from edm_lightning.attacks.knockoff import KnockoffDataModule, knockoff_cost
from edm_lightning.attacks.registry import CACHE_DIR, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob
from edm_lightning.attacks.transfer_set import Reward, Strategy
from edm_lightning.data.images import batch_loader
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models.semi_supervised_clone import (
    SemiSupervisedCloneModule,
    StrongAugment,
    WeakAugment,
    check_fixmatch_settings,
)
from edm_lightning.optim import OptimConfig

__all__ = ["AUGMENT_SECONDS_PER_IMAGE", "SemiSupervisedDataModule", "UnlabelledImages", "check_knockoff_fixmatch",
           "check_mu", "knockoff_fixmatch_cost", "knockoff_fixmatch_job"]

#: Seconds per unlabelled image for its weak and strong views (drawn image by image) on the 2-core CPU.
AUGMENT_SECONDS_PER_IMAGE = 4e-4


class UnlabelledImages(Dataset):
    """The pool images at ``positions``, served as float images in [0, 1], cycled to ``length`` items.

    Item ``i`` is ``images[positions[i % len(positions)]]``: a length that is a multiple of the positions' count
    holds every image equally often.

    Args:
        images: the pool, uint8 ``(N, C, H, W)``.
        positions: the unlabelled images' positions in it, ``(M,)`` with ``M >= 1``.
        length: items served, ``>= 1``.
    """

    def __init__(self, images: Tensor, positions: Tensor, length: int):
        self.images, self.positions, self.length = images, positions, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        index = torch.as_tensor(indices, dtype=torch.long) % len(self.positions)
        return self.images[self.positions[index]].float().div_(255)


class SemiSupervisedDataModule(KnockoffDataModule):
    """KnockoffNets' transfer set, and the rest of the surrogate pool as unlabelled images.

    The transfer set is bought (or read back) exactly as :class:`~edm_lightning.attacks.KnockoffDataModule` buys it
    from the pool as it is (``pool_transform: none``), in the same cache file. ``unlabelled`` holds the positions of
    every pool image the transfer set does not hold (whatever the sampling strategy drew, repeats included); they are
    never shown to the victim. The training
    loader is a ``CombinedLoader`` (mode ``min_size``) of ``{"labelled": (x, answers), "unlabelled": u}``: one
    pass over the transfer set per epoch in batches of ``batch_size``, each paired with ``mu * batch_size``
    unlabelled images (the unlabelled loader is made long enough never to end an epoch first). A budget that buys
    the whole pool leaves nothing unlabelled: the loader is the transfer set's alone, with a warning.

    Args:
        victim, dataset, surrogate, strategy, reward, budget, label_only, policy_arch, policy_lr, diversity_window,
            query_copies, copy_noise, copy_shift, query_batch_size, root, batch_size, test_size, cache_dir,
            num_workers, seed: see :class:`~edm_lightning.attacks.KnockoffDataModule`.
        mu: unlabelled images per bought image in a step (FixMatch's mu), a whole number >= 1.

    Raises:
        ConfigError: ``mu`` is not a whole number >= 1, or what :class:`KnockoffDataModule` refuses.
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
        mu: int = 3,
        root: str = "data",
        batch_size: int = 128,
        test_size: int | None = None,
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
    ):
        check_mu(mu)
        super().__init__(victim, dataset, surrogate, strategy, reward, budget, label_only, policy_arch, policy_lr,
                         diversity_window, query_copies, copy_noise, copy_shift, query_batch_size, root, batch_size,
                         test_size, cache_dir, num_workers, seed)
        self.save_hyperparameters(ignore=["victim"])
        self.unlabelled: Tensor | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.unlabelled is None:
            images, _ = self._surrogate_images()
            left = torch.ones(len(images), dtype=torch.bool)
            left[self.transfer.indices] = False
            self.unlabelled = left.nonzero(as_tuple=True)[0]

    @override
    def train_dataloader(self) -> CombinedLoader | DataLoader:
        labelled = super().train_dataloader()
        if self.unlabelled is None:
            raise RuntimeError("the attack has no unlabelled images yet: setup('fit') has not run")
        if not len(self.unlabelled):
            rank_zero_warn(f"the transfer set holds every one of the {self.hparams.surrogate!r} pool's images: nothing is "
                           "left unlabelled, so the clone trains on the bought answers alone (lower the budget, or "
                           "use a larger pool)")
            return labelled
        batch = self.hparams.mu * self.hparams.batch_size
        needed = math.ceil(len(self.train_set) / self.hparams.batch_size) * batch  # one labelled pass's worth
        length = len(self.unlabelled) * math.ceil(needed / len(self.unlabelled))  # >= needed, every image equally often
        images, _ = self._surrogate_images()
        generator = torch.Generator().manual_seed(self.hparams.seed + 1)  # not the labelled loader's stream
        unlabelled = batch_loader(UnlabelledImages(images, self.unlabelled, length), batch, shuffle=True,
                                  num_workers=self.hparams.num_workers, generator=generator)
        return CombinedLoader({"labelled": labelled, "unlabelled": unlabelled}, mode="min_size")

    @override
    def figures(self) -> dict[str, Any]:
        """KnockoffNets' figures under this attack's name, with the unlabelled images and ``mu``."""
        figures = super().figures()
        return {**figures, "attack": figures["attack"].replace("knockoff", "knockoff_fixmatch", 1),
                "unlabelled": len(self.unlabelled) if self.unlabelled is not None else 0, "mu": self.hparams.mu}


def check_mu(mu: int) -> None:
    """Refuse an unlabelled batch ratio that is not a whole number >= 1.

    Raises:
        ConfigError: ``mu`` is not a whole number >= 1.
    """
    if isinstance(mu, bool) or not isinstance(mu, int) or mu < 1:
        raise ConfigError(f"mu must be a whole number >= 1 (unlabelled images per bought image in a step; FixMatch: 7), "
                          f"got {mu!r}")


def check_knockoff_fixmatch(budget: int, options: Mapping[str, Any]) -> None:
    """Refuse, before a runner's first stage, the FixMatch settings the attack would refuse (defaults for those
    ``options`` leaves out).

    Raises:
        ConfigError: ``mu``, ``tau``, ``lambda_u`` or an augmentation name out of range (the message says the range).
    """
    check_mu(options.get("mu", 3))
    check_fixmatch_settings(options.get("tau", 0.95), options.get("lambda_u", 1.0),
                            options.get("labelled_augment", "shift"), options.get("weak_augment", "shift"),
                            options.get("strong_augment", "randaugment"))


def knockoff_fixmatch_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: KnockoffNets' (buying, one pass over the transfer set per epoch) and, per epoch,
    ``mu`` unlabelled images per bought one, each seen twice (weak and strong views) and augmented image by image.

    Returns:
        The estimate, in seconds.
    """
    items = budget // int(options.get("query_copies", 1))
    unlabelled = epochs * items * int(options.get("mu", 3))
    return (knockoff_cost(budget, epochs, seconds_per_image_epoch, options)
            + unlabelled * (2 * seconds_per_image_epoch + AUGMENT_SECONDS_PER_IMAGE))


@register_attack("knockoff_fixmatch", forwards_to=SemiSupervisedDataModule, surrogate_pool=True, shares_purchase=True,
                 cost=knockoff_fixmatch_cost, check=check_knockoff_fixmatch)
def knockoff_fixmatch_job(
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
    mu: int = 3,
    tau: float = 0.95,
    lambda_u: float = 1.0,
    labelled_augment: WeakAugment = "shift",
    weak_augment: WeakAugment = "shift",
    strong_augment: StrongAugment = "randaugment",
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> AttackJob:
    """KnockoffNets with a FixMatch clone as a job: what ``python main.py fit --config
    configs/attack/knockoff_fixmatch.yaml`` builds; from Python, ``ATTACKS.get("knockoff_fixmatch").run(victim, ...)``.

    It buys what :func:`~edm_lightning.attacks.knockoff_job` buys with the same sampling settings (one shared cache),
    and trains :class:`~edm_lightning.models.SemiSupervisedCloneModule` (``tau``, ``lambda_u``, the augmentations) on
    it and on the unbought rest of the pool (``mu`` unlabelled images per bought one in a step). ``options`` go to
    :class:`SemiSupervisedDataModule` (``reward``, ``query_batch_size`` ...).

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`); nothing is built or bought yet.

    Raises:
        ConfigError: a FixMatch setting out of range (:func:`check_knockoff_fixmatch`).
    """
    check_knockoff_fixmatch(budget, {"mu": mu, "tau": tau, "lambda_u": lambda_u, "labelled_augment": labelled_augment,
                                     "weak_augment": weak_augment, "strong_augment": strong_augment})
    data_args = dict(victim=victim, dataset=dataset, surrogate=surrogate, strategy=strategy, budget=budget,
                     label_only=label_only, mu=mu, root=root, batch_size=batch_size, test_size=test_size,
                     cache_dir=cache_dir, seed=seed, **options)
    module_args = dict(arch=arch, optim=optim or OptimConfig(name="adam", lr=1e-3, schedule="cosine"), tau=tau,
                       lambda_u=lambda_u, labelled_augment=labelled_augment, weak_augment=weak_augment,
                       strong_augment=strong_augment)
    return AttackJob(SemiSupervisedCloneModule, module_args, SemiSupervisedDataModule, data_args, max_epochs, seed)
