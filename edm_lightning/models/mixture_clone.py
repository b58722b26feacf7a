"""The mixture clone: an attacker who knows EDM serves each query with one of N members.

The attacker knows N and that one member answers each query, not the weights, the router or its key. The
clone has N heads (over a shared trunk, or N separate nets) and learns which head each transfer-set answer
belongs to, as in EM for a mixture of experts (Jacobs et al. 1991): each answer is assigned to the head
that explains it best (hard, k-means-like) or to every head by its posterior (soft, with a temperature),
and each head is trained on its share. With ``balanced`` assignment the posteriors of a batch are first
rescaled (Sinkhorn-Knopp, as SwAV's; Caron et al. 2020) so that every head takes an equal share, as a
balanced router gives every member: without it one head learns the average and the others die.

Since EDM's members agree in distribution, heads that each fit one member's answers may escape the
discontinuity that a single clone trained on the mixed answers suffers. Which head fits which member is not
identifiable input by input (two heads that swap members on part of the inputs explain the answers as well),
so the clone is judged by what is: the heads' consensus (the mean of their softmaxes, what :meth:`forward`
returns) and the best single head.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from edm_lightning.errors import ConfigError
from edm_lightning.models.clone import CloneModule
from edm_lightning.models.step_logs import log_training_step
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig, build_optimizer

__all__ = ["MixtureCloneModule", "assign_heads", "split_last_linear"]


class MixtureCloneModule(CloneModule):
    """A clone with ``heads`` heads trained by latent assignment of each answer to a head.

    Training batches are ``(x, target)`` as for :class:`~edm_lightning.models.CloneModule`; the loss of
    an answer is the assigned head's cross-entropy (:func:`assign_heads`). Evaluation adds each head's
    accuracy and agreement and ``best_head/acc``, ``best_head/agreement`` (the head best on the test set:
    an upper bound for an attacker who picks one head).

    Args:
        arch: the clone's architecture (each head's, or the trunk's).
        num_classes: number of classes of the victim.
        input_shape: (channels, height, width) of the victim's inputs.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        optim: optimiser and schedule.
        heads: N, the number of members the attacker assumes.
        shared_trunk: one trunk with N linear heads (the net's last layer, N times); otherwise N whole nets.
        assignment: ``hard`` (each answer to its best head) or ``soft`` (to every head by its posterior).
        temperature: the posterior is ``softmax(-loss / temperature)``.
        balanced: rescale each batch's posteriors so that every head takes an equal share.

    Raises:
        ConfigError: ``heads < 1``, ``temperature <= 0``, or an unknown assignment.
    """

    def __init__(
        self,
        arch: str = "lenet5",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
        heads: int = 5,
        shared_trunk: bool = True,
        assignment: Literal["hard", "soft"] = "soft",
        temperature: float = 0.5,
        balanced: bool = True,
    ):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ConfigError(f"heads must be a whole number >= 1 (the members the attacker assumes), got {heads!r}")
        if assignment not in ("hard", "soft") or not temperature > 0:
            raise ConfigError(f"assignment must be 'hard' or 'soft' and temperature > 0, got {assignment!r}, {temperature!r}")
        super().__init__(arch, num_classes, input_shape, mean, std, optim)
        self.save_hyperparameters()
        if shared_trunk:
            self.net, features = split_last_linear(self.net)  # the trunk
            self.heads = nn.ModuleList(nn.Linear(features, num_classes) for _ in range(heads))
        else:
            self.heads = nn.ModuleList([self.net] + [build_net(arch, input_shape, num_classes, mean, std)
                                                     for _ in range(heads - 1)])
            self.net = nn.Identity()
        self.head_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(heads))
        self.head_agreement = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(heads))

    def head_logits(self, x: Tensor) -> Tensor:
        """Logits of every head ``(N, heads, num_classes)`` for images ``x`` ``(N, C, H, W)`` in [0, 1]."""
        trunk = self.net(x)
        return torch.stack([head(trunk) for head in self.heads], dim=1)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The consensus: log of the heads' mean softmax ``(N, num_classes)`` (logits up to a constant)."""
        return self.head_logits(x).softmax(dim=-1).mean(dim=1).clamp_min(1e-12).log()

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, target = batch
        logits = self.head_logits(x)
        if not target.is_floating_point():
            target = nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)
        per_head = -(target[:, None, :] * logits.log_softmax(dim=-1)).sum(dim=-1)  # (N, heads)
        weights = assign_heads(per_head.detach(), self.hparams.assignment, self.hparams.temperature, self.hparams.balanced)
        loss = (weights * per_head).sum(dim=1).mean()
        shares = weights.mean(dim=0)
        log_training_step(self, {"train/loss": loss, "train/largest_head_share": shares.max()})
        return loss

    @override
    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        x, label, victim_label = batch
        predictions = self.head_logits(x).argmax(dim=-1)  # (N, heads)
        for head in range(predictions.shape[1]):
            self.head_acc[head].update(predictions[:, head], label)
            self.head_agreement[head].update(predictions[:, head], victim_label)

    @override
    def on_test_epoch_end(self) -> None:
        acc = torch.stack([metric.compute() for metric in self.head_acc])
        agreement = torch.stack([metric.compute() for metric in self.head_agreement])
        best = int(acc.argmax())
        self.log_dict({"test/best_head/acc": acc[best], "test/best_head/agreement": agreement[best],
                       **{f"test/head_{h}/acc": a for h, a in enumerate(acc)}})
        self._figures = {"heads": len(self.heads), "best_head_acc": float(acc[best]),
                         "best_head_agreement": float(agreement[best]), "head_accs": [round(float(a), 4) for a in acc]}
        for metric in (*self.head_acc, *self.head_agreement):
            metric.reset()

    def figures(self) -> dict:
        """The last test's per-head figures (for :func:`~edm_lightning.attacks.run_attack`'s results).

        Returns:
            ``heads``, ``best_head_acc``, ``best_head_agreement``, ``head_accs`` (empty before a test).
        """
        return dict(getattr(self, "_figures", {}))

    @override
    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.optim, self.trainer.max_epochs)


def assign_heads(losses: Tensor, assignment: str = "soft", temperature: float = 0.5, balanced: bool = False,
                 iterations: int = 5) -> Tensor:
    """The E-step: each answer's weight on each head ``(N, heads)``, rows summing to 1.

    The posterior is ``softmax(-loss / temperature)`` per answer; ``balanced`` alternately rescales its
    columns (every head the same total) and rows (``iterations`` Sinkhorn-Knopp steps); ``hard`` then puts
    all weight on each row's largest entry.

    Returns:
        The weights, detached.

    Example:
        >>> assign_heads(torch.tensor([[0.2, 1.0], [3.0, 0.1]]), "hard")
        tensor([[1., 0.],
                [0., 1.]])
    """
    weights = (-(losses - losses.min(dim=1, keepdim=True).values) / temperature).exp()
    if balanced:
        for _ in range(iterations):
            weights = weights / weights.sum(dim=0, keepdim=True)
            weights = weights / weights.sum(dim=1, keepdim=True)
    else:
        weights = weights / weights.sum(dim=1, keepdim=True)
    if assignment == "hard":
        return nn.functional.one_hot(weights.argmax(dim=1), losses.shape[1]).to(losses.dtype)
    return weights.detach()


def split_last_linear(net: nn.Module) -> tuple[nn.Module, int]:
    """``net`` without its last ``nn.Linear`` (replaced by the identity), and that layer's input width.

    Returns:
        ``(trunk, in_features)``: the trunk maps images to the last layer's input features.

    Raises:
        ConfigError: ``net`` has no linear layer.
    """
    trunk = copy.deepcopy(net)
    names = [name for name, module in trunk.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(net).__name__} has no linear last layer to split into heads; use shared_trunk: false")
    parent_name, _, child = names[-1].rpartition(".")
    parent = trunk.get_submodule(parent_name) if parent_name else trunk
    features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return trunk, features
