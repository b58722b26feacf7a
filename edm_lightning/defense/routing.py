"""Routers: which ensemble member answers each query, deterministically across processes and machines.

- :class:`NeuralHashRouter` is the EDM paper's: a small classifier H trained on an auxiliary dataset,
  ``p = softmax(H(x))``, member ``= (m * argmax p + floor((M * max p - 1) * m / (M - 1))) mod N`` with
  ``M = 10``, ``m = 2``. Similar inputs get similar ``p``, hence the same member, so re-sending a query
  with faint noise does not let an attacker average the members' answers.
- :class:`KeyedHashRouter` hashes the quantised input bytes with keyed BLAKE2b: cheap, no extra network,
  unpredictable without the key, but a one-pixel change moves the query to another member.
- :class:`~edm_lightning.defense.defended.FixedRouter` always picks one member (the undefended case).

None of them uses Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from edm_lightning.defense.defended import FixedRouter, Router

__all__ = ["ROUTERS", "KeyedHashRouter", "NeuralHashRouter", "build_router", "neural_hash_index", "quantise"]

ROUTERS = ("fixed", "neural", "keyed")


class NeuralHashRouter(Router):
    """The paper's neural hash over a frozen hash network ``hash_net`` (logits for ``M`` classes).

    Balance: for N = 5, ``2 * argmax mod 5`` visits each member exactly twice over the 10 classes
    (0, 2, 4, 1, 3, 0, 2, 4, 1, 3), and the confidence term adds 0 (``max p < 0.55``) or 1, so the
    spread over members is as balanced as H's argmax over its classes on the queries it sees.

    Args:
        hash_net: classifier taking the ensemble's inputs (images in [0, 1]) and returning logits.
        num_members: N, the number of ensemble members.
        num_bins: M in the formula (the paper: 10, the hash network's class count).
        multiplier: m in the formula (the paper: 2).
    """

    def __init__(self, hash_net: nn.Module, num_members: int, num_bins: int = 10, multiplier: int = 2):
        super().__init__()
        _check_members(num_members)
        if num_bins < 2 or multiplier < 1:
            raise ValueError(f"num_bins must be >= 2 and multiplier >= 1, got {num_bins} and {multiplier}")
        self.hash_net = hash_net.eval().requires_grad_(False)
        self.num_members = num_members
        self.num_bins = num_bins
        self.multiplier = multiplier

    def train(self, mode: bool = True) -> "NeuralHashRouter":
        super().train(mode)
        self.hash_net.eval()  # a hash must not change with the caller's mode (BatchNorm, dropout)
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        probs = self.hash_net(x).float().softmax(dim=-1)
        return neural_hash_index(probs, self.num_members, self.num_bins, self.multiplier)


class KeyedHashRouter(Router):
    """Member ``= BLAKE2b_key(uint8 bytes of the input) mod N``: a secret, process-independent byte hash.

    Inputs are quantised to 8-bit pixels first (``round(255 * x)``), so float noise below half a grey
    level does not change the member, but anything coarser usually does.
    """

    def __init__(self, num_members: int, key: str | bytes = "edm-lightning"):
        super().__init__()
        _check_members(num_members)
        key = key.encode() if isinstance(key, str) else bytes(key)
        if not 0 < len(key) <= hashlib.blake2b.MAX_KEY_SIZE:
            raise ValueError(f"keyed router key must be 1 to {hashlib.blake2b.MAX_KEY_SIZE} bytes, got {len(key)}")
        self.num_members = num_members
        self._key = key

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        rows = quantise(x).reshape(x.shape[0], -1).cpu().numpy()
        members = [
            int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=self._key).digest(), "little")
            % self.num_members
            for row in rows
        ]
        return torch.tensor(members, dtype=torch.long, device=x.device)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}"  # never print the key


def neural_hash_index(probs: Tensor, num_members: int, num_bins: int = 10, multiplier: int = 2) -> Tensor:
    """``(m * argmax p + floor((M * max p - 1) * m / (M - 1))) mod N`` for each row of ``probs``."""
    confidence, label = probs.max(dim=-1)
    offset = torch.floor((num_bins * confidence - 1) * multiplier / (num_bins - 1)).long()
    return torch.remainder(multiplier * label + offset, num_members)


def quantise(x: Tensor) -> Tensor:
    """Images in [0, 1] as uint8 pixels, the representation a byte hash must see."""
    return (x.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def build_router(
    kind: str,
    num_members: int,
    *,
    member: int = 0,
    key: str = "edm-lightning",
    hash_checkpoint: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Router:
    """The router a config names: ``fixed`` (``member``), ``neural`` (``hash_checkpoint``) or ``keyed`` (``key``).

    ``input_shape``, when given, is checked against the hash network's, so a hash net trained for other
    inputs fails here rather than at the first query.
    """
    if kind == "fixed":
        return FixedRouter(num_members, member)
    if kind == "keyed":
        return KeyedHashRouter(num_members, key)
    if kind == "neural":
        return NeuralHashRouter(load_hash_net(hash_checkpoint, input_shape), num_members)
    raise ValueError(f"Unknown router {kind!r}. Known routers: {', '.join(ROUTERS)}.")


def load_hash_net(hash_checkpoint: str | None, input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The frozen net of a ``ClassifierModule`` checkpoint trained with ``configs/hashnet.yaml``."""
    from edm_lightning.models.classifier import ClassifierModule

    if hash_checkpoint is None:
        raise ValueError(
            "router 'neural' needs hash_checkpoint: train the hash network with "
            "`python main.py fit --config configs/hashnet.yaml` and pass runs/hashnet/checkpoints/best.ckpt"
        )
    path = Path(hash_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"Hash network checkpoint {str(path)!r} does not exist. Train it first: "
            "python main.py fit --config configs/hashnet.yaml"
        )
    try:
        module = ClassifierModule.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a hash network (ClassifierModule) checkpoint: {err}") from None
    have = tuple(module.hparams.input_shape)
    if input_shape is not None and have != tuple(input_shape):
        raise ValueError(
            f"hash network {str(path)!r} takes inputs of shape {have}, but the ensemble takes {tuple(input_shape)}"
        )
    return module.net.eval()


def _check_members(num_members: int) -> None:
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
