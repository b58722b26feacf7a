"""The EDM paper's router: a small hash network H and a formula on its output.

``p = softmax(H(x))``, member ``= (m * argmax p + floor((M * max p - 1) * m / (M - 1))) mod N`` with ``M = 10``,
``m = 2``. Similar inputs get similar ``p``, hence the same member, so re-sending a query with faint noise does
not let an attacker average the members' answers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.checkpoints import checkpoint_class, load_classifier_net, trained_on
from edm_lightning.errors import ConfigError
from edm_lightning.routing.base import ROUTERS, Router, check_members

__all__ = ["BALANCE_KEY", "NeuralHashRouter", "balance_logit_bias", "load_hash_net", "neural_hash_index"]

BALANCE_KEY = "hash_balance"  # checkpoint entry written by models.hashnet.HashBalanceCallback


@ROUTERS.register("neural")
class NeuralHashRouter(Router):
    """The paper's neural hash over a frozen hash network ``hash_net`` (logits for ``M`` classes).

    Balance: for N = 5, ``2 * argmax mod 5`` visits each member exactly twice over the 10 classes
    (0, 2, 4, 1, 3, 0, 2, 4, 1, 3), and the confidence term adds 0 (``max p < 0.55``) or 1, so the
    arithmetic is balanced - but only as balanced as H's argmax on the queries it sees. An H trained on
    an auxiliary set (Animal-MNIST) sends FashionMNIST test images to its classes very unevenly (one
    class 31%), which put 36% of them on one member (1.82x the fair share). The fix keeps the
    formula: ``p = softmax(H(x) + b)`` with per-class offsets ``b`` fitted (:func:`balance_logit_bias`)
    on the defender's own training images so that H's classes are used equally, stored in the hash
    checkpoint by :class:`~edm_lightning.models.hashnet.HashBalanceCallback`. ``b`` is constant, so nearby
    inputs still share a member.

    Batch independence: a float network's output for one input moves in the last bits with the batch it is
    computed in (the kernels change with the batch size), so an input near a member boundary could be sent
    to two members by an attacker who controls batching. H therefore always runs on blocks of exactly
    ``block_size`` rows (the last block padded), and an input's member depends on that input alone.

    Args:
        hash_net: classifier taking the ensemble's inputs (images in [0, 1]) and returning logits.
        num_members: N, the number of ensemble members.
        logit_bias: per-class offsets added to H's logits (``None``: zeros, the paper's router).
        num_bins: M in the formula (the paper: 10, the hash network's class count).
        multiplier: m in the formula (the paper: 2).
        block_size: rows per hash-network call (every call, whatever the batch).
    """

    def __init__(
        self,
        hash_net: nn.Module,
        num_members: int,
        logit_bias: Tensor | None = None,
        num_bins: int = 10,
        multiplier: int = 2,
        block_size: int = 64,
    ):
        super().__init__()
        check_members(num_members)
        if num_bins < 2 or multiplier < 1:
            raise ConfigError(f"num_bins must be >= 2 and multiplier >= 1, got {num_bins} and {multiplier}")
        self.hash_net = hash_net.eval().requires_grad_(False)
        self.register_buffer("logit_bias", torch.as_tensor(0.0 if logit_bias is None else logit_bias).float())
        self.num_members = num_members
        self.num_bins = num_bins
        self.multiplier = multiplier
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    needs_hash_network = True
    exportable = True

    @classmethod
    def from_config(cls, num_members: int, *, hash_checkpoint: str | None = None,
                    input_shape: tuple[int, int, int] | None = None, ensemble_data: str | None = None,
                    **supplied: Any) -> Router:
        """Over the hash network of ``hash_checkpoint`` (:func:`load_hash_net`), with its balancing offsets.

        Returns:
            The router.
        """
        net, bias = load_hash_net(hash_checkpoint, input_shape, ensemble_data)
        return cls(net, num_members, bias, **{k: v for k, v in supplied.items() if k in cls.options()})

    @override
    def export_route(self, x: Tensor) -> Tensor:
        """The formula on the hash network run over the whole batch at once (a graph cannot loop over blocks).

        Returns:
            Member indices ``(N,)``.
        """
        probs = (self.hash_net(x).float() + self.logit_bias).softmax(dim=-1)
        return neural_hash_index(probs, self.num_members, self.num_bins, self.multiplier)

    @override
    def train(self, mode: bool = True) -> NeuralHashRouter:
        super().train(mode)
        self.hash_net.eval()  # a hash must not change with the caller's mode (BatchNorm, dropout)
        return self

    @override
    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():  # the kernels of no_grad, without its bookkeeping (the same routes, ~5% faster)
            probs = (self.logits(x).float() + self.logit_bias).softmax(dim=-1)
            route = neural_hash_index(probs, self.num_members, self.num_bins, self.multiplier)
        return route.clone()  # an ordinary tensor outside inference mode

    def logits(self, x: Tensor) -> Tensor:
        """H's logits ``(N, M)``, computed in blocks of exactly ``block_size`` rows (see the class docstring)."""
        blocks = []
        for block in x.split(self.block_size):
            rows = block.shape[0]
            if rows < self.block_size:
                block = torch.cat([block, block.new_zeros((self.block_size - rows, *block.shape[1:]))])
            blocks.append(self.hash_net(block)[:rows])
        if len(blocks) == 1:  # a batch of at most one block: no copy
            return blocks[0]
        return torch.cat(blocks) if blocks else self.hash_net(x)


def neural_hash_index(probs: Tensor, num_members: int, num_bins: int = 10, multiplier: int = 2) -> Tensor:
    """``(m * argmax p + floor((M * max p - 1) * m / (M - 1))) mod N`` for each row of ``probs`` ``(B, M)``.

    The EDM paper's neural hash: the hash network's top class sets the base ``m * argmax p``, its confidence
    adds an offset (for ``M = 10``, ``m = 2``: 0 below 0.55, 1 from 0.55, 2 at exactly 1).

    Returns:
        Member indices ``(B,)`` in ``[0, num_members)``.

    Example:
        >>> probs = torch.tensor([[0.50, 0.50] + [0.0] * 8,   # class 0, unsure  -> 2*0 + 0 = 0
        ...                       [0.00, 0.90] + [0.1] + [0.0] * 7,  # class 1, sure -> 2*1 + 1 = 3
        ...                       [0.0] * 9 + [1.0]])         # class 9, certain -> (18 + 2) mod 5 = 0
        >>> neural_hash_index(probs, num_members=5)
        tensor([0, 3, 0])
    """
    confidence, label = probs.max(dim=-1)
    offset = torch.floor((num_bins * confidence - 1) * multiplier / (num_bins - 1)).long()
    return torch.remainder(multiplier * label + offset, num_members)


def load_hash_net(
    hash_checkpoint: str | None, input_shape: tuple[int, int, int] | None = None, ensemble_data: str | None = None
) -> tuple[nn.Module, Tensor | None]:
    """The frozen net of a ``ClassifierModule`` checkpoint trained with ``configs/hashnet.yaml``, and its
    balancing logit offsets (``None`` if the checkpoint was saved without
    :class:`~edm_lightning.models.hashnet.HashBalanceCallback`).

    A hash network is trained on an auxiliary dataset: one trained on ``ensemble_data`` (the ensemble's own
    data, when known) is the ensemble's target, not a hash network, and is refused.

    Returns:
        ``(net, logit_bias or None)``.

    Raises:
        ConfigError: no checkpoint named, not a readable classifier checkpoint, or inputs of another shape.
        CheckpointNotFoundError: no file at ``hash_checkpoint``.
    """
    if hash_checkpoint is None:
        raise ConfigError(
            "router 'neural' needs hash_checkpoint: train the hash network with "
            "`python main.py fit --config configs/hashnet.yaml` and pass runs/hashnet/checkpoints/best.ckpt"
        )
    net, hp, state = load_classifier_net(hash_checkpoint, "Hash network", "python main.py fit --config configs/hashnet.yaml")
    if checkpoint_class(state) not in (None, "ClassifierModule"):
        raise ConfigError(f"hash network {str(hash_checkpoint)!r} is a {checkpoint_class(state)} checkpoint; train the hash "
                          "network with `python main.py fit --config configs/hashnet.yaml`")
    hash_data = trained_on(state)
    if hash_data is not None and hash_data == ensemble_data:
        raise ConfigError(
            f"hash network {str(hash_checkpoint)!r} was trained on {hash_data!r}, the ensemble's own data: that is a "
            "target, not a hash network. Train the hash network on an auxiliary dataset (configs/hashnet.yaml)."
        )
    have = tuple(hp["input_shape"])
    if input_shape is not None and have != tuple(input_shape):
        raise ConfigError(
            f"hash network {str(hash_checkpoint)!r} takes inputs of shape {have}, but the ensemble takes {tuple(input_shape)}"
        )
    balance = state.get(BALANCE_KEY)
    bias = None if balance is None else torch.tensor(balance["logit_bias"], dtype=torch.float32)
    return net, bias


def balance_logit_bias(logits: Tensor, max_iter: int = 200) -> Tensor:
    """Offsets ``b`` with ``mean_x softmax(logits_x + b) = uniform``: H's classes used equally on these inputs.

    The minimiser of the convex ``mean_x logsumexp(logits_x + b) - mean(b)`` (its gradient is the mean
    softmax minus 1/M), found with L-BFGS; ``b`` is centred to zero mean.

    Returns:
        ``b`` ``(M,)``, float32, zero mean.
    """
    logits = logits.detach().float()
    bias = torch.zeros(logits.shape[-1], requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        value = torch.logsumexp(logits + bias, dim=-1).mean() - bias.mean()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(objective)
    bias = bias.detach()
    return bias - bias.mean()
