"""The EDM defender: N members trained to be accurate in distribution and to disagree out of it."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import SecretStr
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from edm_lightning.checkpoints import check_structure
from edm_lightning.errors import ConfigError
from edm_lightning.losses import DiversityLoss, coherence, max_pairwise_similarity
from edm_lightning.models.base import RecordedModule
from edm_lightning.models.classifier import accuracy_metrics
from edm_lightning.models.step_logs import log_training_step
from edm_lightning.models.synthesis import Synthesis
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig, build_optimizer
from edm_lightning.routing import (
    RouterConfig,
    answer_routed,
    as_secret,
    build_router,
    check_key_fingerprint,
    plain_router,
    router_class,
    router_label,
)

__all__ = ["EnsembleModule", "check_ensemble_settings"]

#: lambda, the diversity loss's weight, when a config does not set it (the experiment runner's default too).
DIVERSITY_WEIGHT = 1.0

#: The hyper-parameters that fix the shape of an ensemble's weights; a checkpoint must agree on all of them.
STRUCTURE = ("num_members", "arch", "num_classes", "input_shape")


class EnsembleModule(RecordedModule):
    """EDM (Kariyappa et al., ICLR 2021): loss = mean member CE on ``id`` + lambda * diversity on ``ood``.

    With ``synthesis`` (beyond the paper), the diversity term also sees points made from each training batch the
    way attacks make theirs (JBDA-TR's Jacobian steps, mixup, strong noise), and the CE term a mildly corrupted
    copy of the batch, so that the members disagree where in-distribution attackers query and agree where benign
    clients do (:class:`~edm_lightning.models.synthesis.Synthesis`).

    Training batches are dicts ``{"id": (x, y), "ood": x_ood}`` (:class:`~edm_lightning.data.EDMDataModule`).
    Validation and test take two loaders, ``[in-distribution (x, y), held-out OOD x]``, and log each
    member's accuracy (``member_i/acc``) and share of the routed inputs (``member_i/share``, balance:
    1/N each is fair), the routed, i.e. defended, accuracy (``acc``), and the
    coherence of the ensemble on both (``id/coherence``, ``ood/coherence``: mean smooth coherence;
    ``*/coherent_share``: share of inputs whose most similar member pair has cosine similarity > 0.5).

    The routed accuracy uses ``router`` (default: the keyed byte hash, which needs no other
    checkpoint). Routers are kept out of the state dict and the hyper-parameters: the checkpoint holds
    the members only (never the secret key), and :func:`~edm_lightning.defense.load_victim`
    serves them behind any router.

    Members run in a plain Python loop: on CPU it beat ``torch.func`` vmap and grouped convolutions
    for small CNNs. Members without BatchNorm (LeNet-5) run once per step on the ``id`` and ``ood``
    batches together; members with BatchNorm keep their own statistics per batch kind and run twice.

    Args:
        arch: member architecture (``lenet5``, ``small_cnn``, ``resnet18``, ``vgg16_bn``).
        num_members: N, the number of independently initialised members (the paper: 5).
        num_classes: number of classes (linked from the DataModule).
        input_shape: (channels, height, width) (linked from the DataModule).
        mean: per-channel normalisation mean (linked).
        std: per-channel normalisation std (linked).
        optim: optimiser and schedule shared by all members.
        diversity_weight: lambda, the weight of the diversity loss on OOD batches.
        temperature: smooth-max temperature of the coherence (1: the paper's log-sum-exp).
        synthesis: synthesised disagreement points and the benign agreement copy (``None``: the paper's EDM).
        router: router of the routed accuracy: ``keyed``, ``coarse``, ``neural`` (needs ``hash_checkpoint``), ``fixed``
            (member 0) or any registered router, with its own settings as ``{class_path: coarse, init_args: {grid: 5}}``.
        router_key: secret key of the keyed routers ``keyed``, ``coarse`` and ``aligned``
            (``None``: ``$EDM_ROUTER_KEY``, ``$EDM_ROUTER_KEY_FILE``,
            or the public default with a warning); never saved, shown as ``**********`` in config dumps.
        hash_checkpoint: hash network checkpoint of the ``neural`` router.
        router_key_fingerprint: the fingerprint the ``keyed``/``coarse`` router's key must have
            (:func:`~edm_lightning.routing.key_fingerprint`, public). The experiment runner writes it, so its stage
            re-run without the experiment's key is refused instead of picking the best epoch by another key's routes.

    Raises:
        ConfigError: bad ensemble settings, an unknown router (or init_args it does not take), a router that needs a
            hash network without ``hash_checkpoint``, or a router key whose fingerprint is not ``router_key_fingerprint``.
    """

    def __init__(
        self,
        arch: str = "lenet5",
        num_members: int = 5,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
        diversity_weight: float = DIVERSITY_WEIGHT,
        temperature: float = 1.0,
        synthesis: Synthesis | None = None,
        router: str | RouterConfig = "keyed",
        router_key: SecretStr | None = None,
        hash_checkpoint: str | None = None,
        router_key_fingerprint: str | None = None,
    ):
        super().__init__()
        check_ensemble_settings(num_members, diversity_weight)
        kind = router_class(router)  # an unknown router, or init_args it does not take, fail here
        if kind.needs_hash_network and hash_checkpoint is None:
            raise ConfigError(f"router {router_label(router)!r} needs hash_checkpoint: train the hash network with `python "
                              "main.py fit --config configs/hashnet.yaml` and pass --model.init_args.hash_checkpoint "
                              "runs/hashnet/checkpoints/best.ckpt")
        if kind.keyed and router_key_fingerprint is not None:
            check_key_fingerprint(router_key, router_key_fingerprint, f"this ensemble's {router_label(router)} router")
        # The router is a serving choice, not part of the trained model: kept out of the hyper-parameters
        # (and so out of checkpoints; the key is a secret), and `main.py test --ckpt_path` can change it.
        self.save_hyperparameters(ignore=["router", "router_key", "hash_checkpoint", "router_key_fingerprint", "synthesis"])
        synthesis = Synthesis.of(synthesis)  # a dict as a checkpoint's hyper-parameters hold it
        self.synthesis = synthesis or Synthesis()
        if synthesis is not None:  # as plain data, so a checkpoint stays readable with torch.load(weights_only=True)
            self.hparams["synthesis"] = asdict(synthesis)
        self.router_kind, self.router_key, self.hash_checkpoint = plain_router(router), as_secret(router_key), hash_checkpoint
        self.optim = optim or OptimConfig()
        self.members = nn.ModuleList(build_net(arch, input_shape, num_classes, mean, std) for _ in range(num_members))
        self.diversity = DiversityLoss(temperature)
        self._mixes_batch = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.members.modules())
        self.val_metrics = EnsembleMetrics(num_members, num_classes, prefix="val/")
        self.test_metrics = EnsembleMetrics(num_members, num_classes, prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        """Every member's logits, ``(members, batch, classes)``."""
        return torch.stack([member(x) for member in self.members])

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        (x, y), x_ood = batch["id"], batch["ood"]
        natural = len(x_ood)  # the OOD set's images; synthesised points follow them
        if self.synthesis.disagree_on:
            points = self.synthesis.disagreement_points(self.members, x, y, self.hparams.num_classes)
            x_ood = torch.cat([x_ood, points.to(x_ood.dtype)])
        if self.synthesis.agrees:
            x, y = torch.cat([x, self.synthesis.agreement_copy(x)]), y.repeat(2)
        id_logits, ood_logits = self.member_logits(x, x_ood)
        ce = F.cross_entropy(id_logits.flatten(0, 1), y.repeat(len(self.members)))  # = mean of the members' CE
        ood_probs = ood_logits.softmax(dim=-1)
        if self.synthesis.weight is None:  # one diversity mean over the whole OOD batch
            diversity = self.diversity(ood_probs)
            figures = {"train/ood_coherence": diversity}
        else:  # the OOD set's term whole, the synthesised points' beside it
            ood = self.diversity(ood_probs[:, :natural])
            # no points at all only where mixup alone finds no two classes in the batch
            synthesised = self.diversity(ood_probs[:, natural:]) if len(x_ood) > natural else ood.new_zeros(())
            diversity = ood + self.synthesis.weight * synthesised
            figures = {"train/ood_coherence": ood, "train/synthesis_coherence": synthesised}
        loss = ce + self.hparams.diversity_weight * diversity
        log_training_step(self, {"train/loss": loss, "train/ce": ce, **figures})
        return loss

    def member_logits(self, x: Tensor, x_ood: Tensor) -> tuple[Tensor, Tensor]:
        """Every member's logits on both batches, ``(members, len(x), classes)`` and ``(members, len(x_ood), classes)``.

        Members without BatchNorm see both batches in one forward pass (the same maths, half the calls, and
        larger matrix products); with BatchNorm, whose statistics would mix the two, in two.

        Returns:
            ``(in-distribution logits, OOD logits)``.
        """
        if self._mixes_batch:
            return self(x), self(x_ood)
        logits = self(torch.cat([x, x_ood]))
        return logits[:, : len(x)], logits[:, len(x):]

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, self.val_metrics)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The defended answer: the routed member's probabilities."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return answer_routed(self.members, self.route(x), x, self.hparams.num_classes)

    @override
    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.optim, self.trainer.max_epochs)

    def route(self, x: Tensor) -> Tensor:
        """Member index of each input under the configured router (built on first use, not checkpointed)."""
        router = self.__dict__.get("_router")
        if router is None:
            router = build_router(
                self.router_kind, self.hparams.num_members, key=self.router_key,
                hash_checkpoint=self.hash_checkpoint, input_shape=tuple(self.hparams.input_shape),
            )
            self.__dict__["_router"] = router  # bypasses nn.Module registration: not a parameter, not saved
        return router.to(x.device)(x)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before any weight is copied, a checkpoint whose ensemble has another shape than this one."""
        saved = checkpoint.get("hyper_parameters") or {}
        if "num_members" not in saved:
            raise ConfigError(
                f"the checkpoint is not an EDM ensemble (hyper-parameters: {sorted(saved)}); "
                "this model is an ensemble of "
                + ", ".join(f"{key}={self.hparams[key]}" for key in STRUCTURE)
            )
        check_structure(saved, dict(self.hparams), STRUCTURE, "ensemble")

    def _evaluate(self, batch: Any, dataloader_idx: int, metrics: EnsembleMetrics) -> None:
        if dataloader_idx == 0:
            x, y = batch
            logits = self(x)
            probs = logits.softmax(dim=-1)
            metrics.update_in_distribution(probs, self.route(x), y)
            ce = torch.stack([F.cross_entropy(member_logits, y) for member_logits in logits]).mean()
            self.log(f"{metrics.prefix}loss", ce, sync_dist=True, add_dataloader_idx=False)
        else:
            metrics.update_ood(self(batch).softmax(dim=-1))
        logged = metrics.logged(dataloader_idx)
        shown = {name for name in logged if name.endswith(("/acc", "/coherence")) and "member_" not in name}
        for prog_bar in (True, False):
            chosen = {name: metric for name, metric in logged.items() if (name in shown) == prog_bar}
            self.log_dict(chosen, add_dataloader_idx=False, prog_bar=prog_bar and metrics.prefix == "val/")


def check_ensemble_settings(num_members: Any, diversity_weight: Any) -> None:
    """The ensemble's own ranges, checked by the module and, before any stage, by the experiment runner.

    Raises:
        ConfigError: fewer than two members, or a negative lambda.
    """
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 2:
        raise ConfigError(f"num_members must be an integer >= 2, got {num_members!r} "
                          "(an EDM ensemble needs num_members >= 2 members to disagree)")
    if not 0 <= diversity_weight < math.inf:  # written so that NaN fails too
        raise ConfigError(f"diversity_weight (lambda) must be a finite number >= 0, got {diversity_weight!r}")


class EnsembleMetrics(nn.Module):
    """One evaluation split's torchmetrics (val or test): routed and per-member accuracy, coherence in and out of distribution."""

    def __init__(self, num_members: int, num_classes: int, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.routed = accuracy_metrics(num_classes)["acc"].clone()
        self.members = nn.ModuleList(
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(num_members)
        )
        self.route_share = nn.ModuleList(MeanMetric() for _ in range(num_members))
        self.coherence = nn.ModuleDict({split: MeanMetric() for split in ("id", "ood")})
        self.coherent_share = nn.ModuleDict({split: MeanMetric() for split in ("id", "ood")})

    def update_in_distribution(self, probs: Tensor, route: Tensor, y: Tensor) -> None:
        self.routed.update(probs[route, torch.arange(y.shape[0], device=y.device)], y)
        for index, (metric, member_probs) in enumerate(zip(self.members, probs)):
            metric.update(member_probs, y)
            self.route_share[index].update((route == index).float())
        self._update_coherence("id", probs)

    def update_ood(self, probs: Tensor) -> None:
        self._update_coherence("ood", probs)

    def logged(self, dataloader_idx: int) -> dict[str, MeanMetric | MulticlassAccuracy]:
        """The metric objects fed by loader ``dataloader_idx`` (0: in-distribution, 1: OOD), by log name."""
        split = "id" if dataloader_idx == 0 else "ood"
        out = {f"{self.prefix}{split}/coherence": self.coherence[split],
               f"{self.prefix}{split}/coherent_share": self.coherent_share[split]}
        if split == "id":
            out[f"{self.prefix}acc"] = self.routed
            out.update({f"{self.prefix}member_{i}/acc": metric for i, metric in enumerate(self.members)})
            out.update({f"{self.prefix}member_{i}/share": metric for i, metric in enumerate(self.route_share)})
        return out

    def _update_coherence(self, split: str, probs: Tensor) -> None:
        self.coherence[split].update(coherence(probs))
        self.coherent_share[split].update((max_pairwise_similarity(probs) > 0.5).float())

