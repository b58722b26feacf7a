"""Routers: which ensemble member answers each query, deterministically across processes and machines.

- :class:`NeuralHashRouter` is the EDM paper's: a small classifier H trained on an auxiliary dataset,
  ``p = softmax(H(x))``, member ``= (m * argmax p + floor((M * max p - 1) * m / (M - 1))) mod N`` with
  ``M = 10``, ``m = 2``. Similar inputs get similar ``p``, hence the same member, so re-sending a query
  with faint noise does not let an attacker average the members' answers.
- :class:`KeyedHashRouter` hashes the quantised input bytes with keyed BLAKE2b: cheap, no extra network,
  unpredictable without the key, but a one-pixel change moves the query to another member.
- :class:`CoarseKeyedHashRouter` hashes, with the same key, a coarse view of the input (cell averages on a
  4 x 4 grid, 4 grey levels each): nearly as balanced as the keyed hash on data the defender never saw, and
  nearly as stable as the neural one under faint noise, without a hash network to train.
- :class:`FixedRouter` always picks one member (the undefended case).

None of them uses Python's ``hash()``, which is salted per process. Routers are plain modules below the
training code: :class:`~edm_lightning.models.EnsembleModule` measures its routed accuracy with them and
:class:`~edm_lightning.defense.Victim` serves with them. Each registers itself in :data:`ROUTERS`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import is_dataclass
from typing import Any

import torch
from jsonargparse.typing import SecretStr
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.checkpoints import checkpoint_class, load_classifier_net, trained_on
from edm_lightning.errors import ConfigError
from edm_lightning.registry import Registry

__all__ = [
    "BALANCE_KEY",
    "DEFAULT_ROUTER_KEY",
    "KEYED_ROUTERS",
    "ROUTERS",
    "ROUTER_KEY_ENV",
    "ROUTER_KEY_FILE_ENV",
    "SECRET_MASK",
    "CoarseKeyedHashRouter",
    "FixedRouter",
    "KeyedHashRouter",
    "NeuralHashRouter",
    "Router",
    "answer_routed",
    "as_secret",
    "balance_logit_bias",
    "build_router",
    "check_key_fingerprint",
    "key_fingerprint",
    "keyed_members",
    "load_hash_net",
    "neural_hash_index",
    "quantise",
    "refuse_keys_on_command_line",
    "resolve_router_key",
]

DEFAULT_ROUTER_KEY = "edm-lightning"  # public: experiments only (a warning says so)
ROUTER_KEY_ENV = "EDM_ROUTER_KEY"
ROUTER_KEY_FILE_ENV = "EDM_ROUTER_KEY_FILE"
SECRET_MASK = "**********"  # what jsonargparse writes for a SecretStr
_warned_public_key = False

#: Router builders by config name: ``(num_members, member, key, hash_checkpoint, input_shape) -> Router``.
ROUTERS: Registry[Callable[..., Router]] = Registry("router")
BALANCE_KEY = "hash_balance"  # checkpoint entry written by models.hashnet.HashBalanceCallback
KEYED_ROUTERS = ("keyed", "coarse")  # the routers whose routes a secret key decides


class Router(nn.Module):
    """Maps a batch of inputs ``(N, C, H, W)`` to member indices ``(N,)`` in ``[0, num_members)``.

    A router must be deterministic and batch-independent: an input gets the same member whatever else
    is in its batch, in any process, on any machine.
    """

    num_members: int

    @override
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class FixedRouter(Router):
    """Every input goes to the same member: the undefended case, and single-member comparisons.

    Raises:
        ValueError: ``member`` is not in ``[0, num_members)``.
    """

    def __init__(self, num_members: int = 1, member: int = 0):
        super().__init__()
        if not 0 <= member < num_members:
            raise ValueError(f"member must be in [0, {num_members}), got {member}")
        self.num_members = num_members
        self.member = member

    @override
    def forward(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), self.member, dtype=torch.long, device=x.device)


def answer_routed(members: Sequence[nn.Module], route: Tensor, x: Tensor, num_classes: int) -> Tensor:
    """Softmax of each input's routed member: probabilities ``(N, num_classes)`` for ``x`` ``(N, C, H, W)``.

    Each member runs only on the inputs routed to it, so a batch costs about one member, not N.

    Returns:
        Probabilities ``(N, num_classes)`` in ``x``'s dtype.

    Raises:
        RuntimeError: a member produced non-finite values (a broken model must not answer NaN).
    """
    probs = x.new_empty((x.shape[0], num_classes))
    for index, member in enumerate(members):
        chosen = (route == index).nonzero(as_tuple=True)[0]
        if chosen.numel():
            answer = member(x[chosen]).softmax(dim=-1).to(probs.dtype)
            if not torch.isfinite(answer).all():
                bad = int((~torch.isfinite(answer)).any(dim=-1).sum())
                raise RuntimeError(f"member {index} produced non-finite answers for {bad} of its {chosen.numel()} "
                                   "queries: the model is broken (check its checkpoint); refusing to serve them")
            probs[chosen] = answer
    return probs


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
        _check_members(num_members)
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

    @override
    def train(self, mode: bool = True) -> NeuralHashRouter:
        super().train(mode)
        self.hash_net.eval()  # a hash must not change with the caller's mode (BatchNorm, dropout)
        return self

    @override
    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        probs = (self.logits(x).float() + self.logit_bias).softmax(dim=-1)
        return neural_hash_index(probs, self.num_members, self.num_bins, self.multiplier)

    def logits(self, x: Tensor) -> Tensor:
        """H's logits ``(N, M)``, computed in blocks of exactly ``block_size`` rows (see the class docstring)."""
        blocks = []
        for block in x.split(self.block_size):
            rows = block.shape[0]
            if rows < self.block_size:
                block = torch.cat([block, block.new_zeros((self.block_size - rows, *block.shape[1:]))])
            blocks.append(self.hash_net(block)[:rows])
        return torch.cat(blocks) if blocks else self.hash_net(x)


class KeyedHashRouter(Router):
    """Member ``= BLAKE2b_key(uint8 bytes of the input) mod N``: a secret, process-independent byte hash.

    Inputs are quantised to 8-bit pixels first (``round(255 * x)``), so float noise below half a grey
    level does not change the member, but anything coarser usually does. The key is resolved by
    :func:`resolve_router_key` (argument, ``EDM_ROUTER_KEY``, ``EDM_ROUTER_KEY_FILE``, or the public
    default with a loud warning) and is never printed: ``repr`` shows its :func:`key_fingerprint`.

    Raises:
        ConfigError: ``num_members < 1``, or an unusable key (see :func:`resolve_router_key`).
    """

    def __init__(self, num_members: int, key: str | bytes | SecretStr | None = None):
        super().__init__()
        _check_members(num_members)
        self.num_members = num_members
        self._key = resolve_router_key(key)

    @override
    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return keyed_members(quantise(x).reshape(x.shape[0], -1), self._key, self.num_members)

    @override
    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, key_fingerprint={key_fingerprint(self._key)!r}"  # never the key


class CoarseKeyedHashRouter(Router):
    """Member ``= BLAKE2b_key(coarse view of the input) mod N``: a keyed hash that faint noise rarely moves.

    The view averages the image (over channels too) on a ``grid x grid`` grid of cells (adaptive average
    pooling) and quantises each cell to ``levels`` grey levels. Averaging a 7 x 7 cell divides pixel noise by
    7, so a re-query with noise of std 0.01 keeps its view, hence its member, unless a cell mean sits within
    a fraction of a grey level of a level boundary. Distinct views are many (thousands on 10,000 MNIST or
    FashionMNIST images) and the keyed hash spreads them over the members; the balance is limited by the most
    common views (the largest holds about 5% of MNIST images), so it varies with the key. Measured by
    ``benchmarks/routing.py`` on 10,000 test images (grid 4, levels 4, N = 5, the public key): largest member
    share 1.15x fair on FashionMNIST, 1.45x on MNIST (1.28x on average over 10 random keys, 1.89x for the worst);
    member kept under noise std 0.01 for 95.5% / 96.2% of re-queries; a 1-pixel shift keeps it for only 27% / 31%
    (the cells move). The key is resolved and hidden as :class:`KeyedHashRouter`'s.

    Args:
        num_members: N.
        key: the secret key (see :func:`resolve_router_key`).
        grid: cells per side of the view.
        levels: grey levels per cell.

    Raises:
        ConfigError: ``num_members < 1``, ``grid < 1``, ``levels`` outside 2..256, or an unusable key.
    """

    def __init__(self, num_members: int, key: str | bytes | SecretStr | None = None, grid: int = 4, levels: int = 4):
        super().__init__()
        _check_members(num_members)
        if grid < 1 or not 2 <= levels <= 256:
            raise ConfigError(f"grid must be >= 1 and levels in 2..256, got {grid} and {levels}")
        self.num_members, self.grid, self.levels = num_members, grid, levels
        self._key = resolve_router_key(key)

    def view(self, x: Tensor) -> Tensor:
        """The coarse view: uint8 cell levels ``(N, grid * grid)`` in ``[0, levels)``."""
        cells = nn.functional.adaptive_avg_pool2d(x.detach().float().mean(dim=1, keepdim=True), self.grid)
        return (cells * self.levels).floor_().clamp_(0, self.levels - 1).to(torch.uint8).flatten(1)

    @override
    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return keyed_members(self.view(x), self._key, self.num_members)

    @override
    def extra_repr(self) -> str:
        return (f"num_members={self.num_members}, grid={self.grid}, levels={self.levels}, "
                f"key_fingerprint={key_fingerprint(self._key)!r}")  # never the key


def keyed_members(rows: Tensor, key: bytes, num_members: int) -> Tensor:
    """``BLAKE2b_key(row bytes) mod num_members`` for each row of ``rows`` ``(N, D)`` (uint8): the keyed routers' hash.

    Returns:
        Member indices ``(N,)``, int64, on ``rows``' device.
    """
    members = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest(), "little") % num_members
               for row in rows.cpu().numpy()]
    return torch.tensor(members, dtype=torch.long, device=rows.device)


def resolve_router_key(key: str | bytes | SecretStr | None = None, public_default: bool = True) -> bytes:
    """The keyed router's secret key as bytes: ``key`` if given, else ``$EDM_ROUTER_KEY``, else the contents of
    the file ``$EDM_ROUTER_KEY_FILE``, else the public default :data:`DEFAULT_ROUTER_KEY` with a loud warning
    (or, with ``public_default=False``, an error: a server must not serve with a key anyone knows).

    Configs type the key as jsonargparse's ``SecretStr``, so config dumps, ``--print_config`` and logged
    configs show ``**********`` instead; a key read back from such a dump is refused rather than used.

    Returns:
        The key, 1 to 64 bytes.

    Raises:
        ConfigError: an empty or too long key, a key file that cannot be read, the mask of a saved config, or
            no key at all where ``public_default`` is false.
    """
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    source = "the config"
    if key is None and os.environ.get(ROUTER_KEY_ENV):
        key, source = os.environ[ROUTER_KEY_ENV], f"${ROUTER_KEY_ENV}"
    elif key is None and os.environ.get(ROUTER_KEY_FILE_ENV):
        path = os.environ[ROUTER_KEY_FILE_ENV]
        try:
            key, source = open(path, "rb").read().strip(), f"the key file {path!r}"
        except OSError as err:
            raise ConfigError(f"cannot read the router key file {path!r} (${ROUTER_KEY_FILE_ENV}): {err.strerror}") from None
    elif key is None and not public_default:
        raise ConfigError(f"no router key is set, and the public default key would let anyone compute which member answers "
                          f"a query: set ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} to a random key "
                          "(python -c \"import secrets; print(secrets.token_hex(32))\")")
    elif key is None:
        _warn_public_key()
        key, source = DEFAULT_ROUTER_KEY, "the public default"
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if raw == SECRET_MASK.encode():
        raise ConfigError(
            f"the router key from {source} is {SECRET_MASK!r}, the mask a saved config shows in place of the key: "
            f"give the real key through ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} (or --...router_key)"
        )
    if not 0 < len(raw) <= hashlib.blake2b.MAX_KEY_SIZE:
        raise ConfigError(f"the router key from {source} must be 1 to {hashlib.blake2b.MAX_KEY_SIZE} bytes, got {len(raw)}")
    return raw


def as_secret(key: str | bytes | SecretStr | None) -> SecretStr | None:
    """``key`` wrapped so that ``repr``, ``str`` and config dumps never show it (``None`` stays ``None``).

    Returns:
        A ``SecretStr``, or ``None``.
    """
    if key is None or isinstance(key, SecretStr):
        return key
    return SecretStr(key.decode("latin-1") if isinstance(key, bytes) else str(key))


def key_fingerprint(key: str | bytes | SecretStr | None) -> str:
    """A short public name of a router key (a keyed hash of a fixed text), to tell runs apart without the key.

    Returns:
        8 hex digits; equal keys give equal fingerprints.
    """
    raw = resolve_router_key(key) if not isinstance(key, bytes) else key
    return hashlib.blake2b(b"edm-lightning router key fingerprint", digest_size=4, key=raw).hexdigest()


def check_key_fingerprint(key: str | bytes | SecretStr | None, expected: str, where: str) -> None:
    """Refuse a router key whose fingerprint is not ``expected`` (the key resolved as :func:`resolve_router_key` does).

    Raises:
        ConfigError: another key, with both fingerprints and where to set the right one.
    """
    found = key_fingerprint(key)
    if found != expected:
        raise ConfigError(f"{where} was set up with the router key of fingerprint {expected}, but the key given "
                          f"(argument, ${ROUTER_KEY_ENV}, ${ROUTER_KEY_FILE_ENV} or the public default) has fingerprint "
                          f"{found}: set ${ROUTER_KEY_ENV} to the key that served it")


def _warn_public_key() -> None:
    global _warned_public_key
    if _warned_public_key:
        return
    _warned_public_key = True
    message = (f"WARNING: the keyed router uses the public default key {DEFAULT_ROUTER_KEY!r}: anyone can compute "
               f"which member answers a query. Set ${ROUTER_KEY_ENV} or ${ROUTER_KEY_FILE_ENV} to a random key "
               "(e.g. `python -c \"import secrets; print(secrets.token_hex(32))\"`) before serving a real model.")
    warnings.warn(message, PublicRouterKeyWarning, stacklevel=3)


def refuse_keys_on_command_line(config: Any, argv: Sequence[str]) -> None:
    """Refuse a run whose parsed ``config`` holds a secret (a ``SecretStr``) that was typed in ``argv``.

    A command line is kept by the shell's history, shown by ``ps`` to every user of the machine and recorded
    by W&B with the run, so a router key must come from ``$EDM_ROUTER_KEY``, ``$EDM_ROUTER_KEY_FILE`` or a
    config file the user keeps private.

    Raises:
        ConfigError: a secret's value appears in ``argv``.
    """
    secrets = [value.get_secret_value() for value in _secrets(config)]
    if any(secret and secret != SECRET_MASK and secret in arg for secret in secrets for arg in argv):
        raise ConfigError(
            f"a secret (a router key or an API key) was given on the command line, where the shell history, `ps` and "
            f"W&B's run metadata keep it: set ${ROUTER_KEY_ENV} (or ${ROUTER_KEY_FILE_ENV} to a file only you can "
            f"read) for a router key, $EDM_API_KEY for an API key, or put it in a config file only you can read"
        )


def _secrets(node: Any) -> list[SecretStr]:
    if isinstance(node, SecretStr):
        return [node]
    if is_dataclass(node) and not isinstance(node, type):
        node = vars(node)
    elif hasattr(node, "as_dict") and not isinstance(node, dict):  # a jsonargparse Namespace
        node = vars(node)
    if isinstance(node, dict):
        return [s for value in node.values() for s in _secrets(value)]
    if isinstance(node, (list, tuple)):
        return [s for value in node for s in _secrets(value)]
    return []


class PublicRouterKeyWarning(UserWarning):
    """The keyed router runs with the public default key (fine for experiments, not for a deployment)."""


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


def quantise(x: Tensor) -> Tensor:
    """Images in [0, 1] as uint8 pixels, the representation a byte hash must see.

    Returns:
        uint8 pixels, ``x``'s shape.

    Example:
        >>> quantise(torch.tensor([0.0, 0.001, 0.5, 1.0]))
        tensor([  0,   0, 128, 255], dtype=torch.uint8)
    """
    return (x.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def build_router(
    kind: str,
    num_members: int,
    *,
    member: int = 0,
    key: str | bytes | SecretStr | None = None,
    hash_checkpoint: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    ensemble_data: str | None = None,
) -> Router:
    """The router a config names: ``fixed`` (``member``), ``neural`` (``hash_checkpoint``), ``keyed`` or ``coarse`` (``key``).

    ``input_shape``, when given, is checked against the hash network's, so a hash net trained for other
    inputs fails here rather than at the first query; ``ensemble_data`` (the ensemble's training dataset),
    when given, must not be the hash network's (see :func:`load_hash_net`).

    Returns:
        The router.

    Raises:
        ConfigError: an unknown ``kind`` (the known ones listed), or settings that kind cannot use.
    """
    return ROUTERS.get(kind)(num_members, member=member, key=key, hash_checkpoint=hash_checkpoint,
                             input_shape=input_shape, ensemble_data=ensemble_data)


@ROUTERS.register("fixed")
def _fixed(num_members: int, *, member: int, **_: object) -> Router:
    return FixedRouter(num_members, member)


@ROUTERS.register("keyed")
def _keyed(num_members: int, *, key: str | bytes | SecretStr | None, **_: object) -> Router:
    return KeyedHashRouter(num_members, key)


@ROUTERS.register("coarse")
def _coarse(num_members: int, *, key: str | bytes | SecretStr | None, **_: object) -> Router:
    return CoarseKeyedHashRouter(num_members, key)


@ROUTERS.register("neural")
def _neural(num_members: int, *, hash_checkpoint: str | None, input_shape: tuple[int, int, int] | None,
            ensemble_data: str | None, **_: object) -> Router:
    net, bias = load_hash_net(hash_checkpoint, input_shape, ensemble_data)
    return NeuralHashRouter(net, num_members, bias)


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


def _check_members(num_members: int) -> None:
    if num_members < 1:
        raise ConfigError(f"num_members must be >= 1, got {num_members}")
