"""Small members of one architecture answering a batch as one stacked network: one call, not one per member.

Five LeNet-5 members answering a batch of 64 queries get about 13 rows each, and every call pays fixed costs (two
oneDNN convolutions, a dozen small operations) that 13 rows do not amortise. Stacked, member ``i`` is group ``i`` of
every layer: its convolution channels one group of a grouped convolution, its linear layers one slice of a batched
matrix product, its batch-norm statistics and normalisation one slice of the channels. The batch then runs once,
each member's rows in its own group, padded with zero rows to the largest group. On the CPU the rows and weights are
in channels-last memory order, oneDNN's own layout (in the default order the reorders and the max-pooling kernel cost
more than the arithmetic of so small a network); a batch that goes to the per-member loop is handed over in that
order too, so a single member is served the same way.

Nothing is stacked on trust:

* only members of at most :data:`MAX_PARAMETERS` parameters each: there the fixed costs dominate. For ResNet-18
  the work per row dominates, the padding would cost more than the calls it saves, and the members keep the plain
  loop in their own memory order;
* only layers of known types (convolution, linear, batch norm with running statistics, normalisation, element-wise
  activations, pooling, flatten, dropout), in containers without weights of their own, all members alike, none
  with hooks, all in eval mode;
* before first use, the stacked network and the channels-last members must give the members' own logits on a probe
  batch, up to float rounding; else the members keep the plain loop;
* a batch that one member answers alone, or whose padding would more than double its rows, runs member by member.

An input's member is the router's decision alone; the stacked network changes only how its logits are computed
(equal to the member's own up to float rounding), and a batch answered whole or in parts gives the same answers up to
float rounding (tested; on the machines measured, parts of at least 16 rows gave the same bits, which the CPU's math
library does not promise everywhere). The
copies are rebuilt when a member's weights change (their storage or their version counter: ``load_state_dict``, an
optimiser step, edits under ``torch.no_grad()``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision import transforms
from torchvision.transforms import v2

from edm_lightning.routing.base import routed_logits

__all__ = ["MAX_PARAMETERS", "FusedMembers", "channels_last"]

#: Members with more parameters each keep the per-member loop (LeNet-5 has 62k, ResNet-18 11.2M).
MAX_PARAMETERS = 1_000_000

_MISSING = object()  # a weight removed since the forms were built

#: Layers without weights that act on each channel (or element) alone: copied as they are into the prepared forms.
_PER_CHANNEL = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Softplus, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.Flatten,
)

#: Layers whose output is a new tensor nobody else holds: a ReLU right after one in a ``Sequential`` works in place.
_FRESH_OUTPUT = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


class FusedMembers:
    """The victim's members prepared for the CPU (see the module docstring), built on first use.

    Two forms, both copies of the members' weights in channels-last order: each member alone (for a batch that one
    member answers, a single member, or the per-member loop), and all of them stacked. Call it as
    ``fused(x, route, counts)`` (:data:`~edm_lightning.routing.base.FusedRun`): the logits of each row's routed member
    in ``x``'s row order, or ``None`` where the plain per-member loop must answer (another device, members it cannot
    prepare or that carry hooks, members in training mode, a caller recording gradients).

    Args:
        members: the victim's members (kept by reference: the copies follow their weights).
    """

    def __init__(self, members: Sequence[nn.Module]):
        self.members = members
        self._weights: list[tuple[dict, str]] = []  # where each weight of the members is held (module dict, name)
        self._hooks: list[dict] = []  # the members' modules' hook tables: a hook added later sends them to the plain loop
        self._modules: list[nn.Module] = []  # every module of the members: a layer replaced or put in training mode
        self._built_for: tuple | None = None  # (storage, version) of each weight when the forms below were built
        self._alone: list[nn.Module] | None = None  # each member prepared alone, or None: the plain loop answers
        self._stacked: nn.Module | None = None  # all members stacked, or None: they answer one by one

    @property
    def stacked(self) -> bool:
        """Whether the members answer as one stacked network (known after the first batch on the CPU)."""
        return self._stacked is not None

    def __getstate__(self) -> dict:
        return {"members": self.members}  # a copy or a pickle prepares its own forms on first use

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def __call__(self, x: Tensor, route: Tensor, counts: Sequence[int]) -> Tensor | None:
        """The routed members' logits, computed by the prepared forms.

        Args:
            x: inputs ``(N, C, H, W)``, already checked, in the members' dtype.
            route: member index of each row ``(N,)``.
            counts: rows per member (:func:`~edm_lightning.routing.base.member_counts`).

        Returns:
            Each row's routed member's logits ``(N, classes)`` in ``x``'s row order, or ``None``: the plain loop answers.
        """
        if (x.device.type != "cpu" or x.ndim != 4 or torch.is_grad_enabled()  # a caller differentiating gets the members
                or any(member.training for member in self.members)):
            return None
        if self._built_for is None or _state(self._weights, self._hooks, self._modules) != self._built_for:
            modules = [module for member in self.members for module in member.modules()]
            self._weights = [(held, name) for module in modules for held in (module._parameters, module._buffers)
                             for name in held]
            self._hooks = [table for module in modules for table in (module._forward_hooks, module._forward_pre_hooks)]
            self._modules = modules
            self._build(x)
            self._built_for = _state(self._weights, self._hooks, self._modules)
        if self._alone is None:
            return None
        rows, largest = x.shape[0], max(counts)
        with torch.inference_mode():  # the copies' operations need no autograd records (3-5% of a LeNet-5 batch)
            if self._stacked is None or largest == rows or len(counts) * largest > 2 * rows + 4 * len(counts):
                logits = routed_logits(self._alone, route, x, counts, layout=channels_last)
            else:
                logits = self._run_stacked(x, route, counts)
        return logits.clone()  # an ordinary tensor again: answers may become training targets, saved for backward

    def _run_stacked(self, x: Tensor, route: Tensor, counts: Sequence[int]) -> Tensor:
        """The stacked network on a ``(largest group, members)`` grid of rows; each row's logits read back at its cell."""
        members, largest = len(counts), max(counts)
        order = torch.argsort(route, stable=True)  # the rows member by member; each one's cell is (its rank, member)
        ranked = torch.tensor([rank * members + member for member, count in enumerate(counts) for rank in range(count)])
        cells = torch.empty_like(order).index_copy_(0, order, ranked)
        grid = x.new_zeros((largest * members, *x.shape[1:])).index_copy_(0, cells, x)
        logits = self._stacked(channels_last(grid.view(largest, -1, *x.shape[2:])))  # (largest, members * classes)
        return logits.reshape(largest * members, -1).index_select(0, cells)

    def _build(self, x: Tensor) -> None:
        """Prepare both forms and check each on a probe batch against the members; a form that fails is not used."""
        self._alone = self._stacked = None
        members = list(self.members)
        if sum(p.numel() for p in members[0].parameters()) > MAX_PARAMETERS:
            self._weights, self._hooks, self._modules = [], [], []  # nothing to follow: they always keep the plain loop
            return
        if _hooked(members):  # the copies would skip what a hook does (or watches)
            return
        if any(module.training for member in members for module in member.modules()):  # a layer left in training
            return  # mode answers unlike its copy, and the probe batch would move its statistics
        generator = torch.Generator().manual_seed(0)
        probe = torch.rand((2 * len(members) + 1, *x.shape[1:]), generator=generator).to(x.dtype)
        route = torch.arange(probe.shape[0]) % len(members)
        counts = torch.bincount(route, minlength=len(members)).tolist()
        with torch.no_grad():
            expected = routed_logits(members, route, probe, counts)
            try:
                alone = [stack([member]) for member in members]
                if any(form is None for form in alone):
                    return
                alone = [form.to(memory_format=torch.channels_last) for form in alone]
                if not _close(routed_logits(alone, route, probe, counts, layout=channels_last), expected):
                    return
                self._alone = alone
                stacked = stack(members) if len(members) > 1 else None
                if stacked is not None:
                    self._stacked = stacked.to(memory_format=torch.channels_last)
                    if not _close(self._run_stacked(probe, route, counts), expected):
                        self._stacked = None
            except Exception:  # noqa: BLE001 - a layer the copies cannot take (or a forward their layout breaks): the
                self._alone = self._stacked = None  # members answer through the plain loop, as they would without this


def channels_last(x: Tensor) -> Tensor:
    """``x`` ``(N, C, H, W)`` in channels-last memory order, also for one channel (which PyTorch otherwise reads as
    the default order: its strides are ambiguous).

    Returns:
        The same values; a view when ``C = 1``.
    """
    if x.shape[1] != 1:
        return x.contiguous(memory_format=torch.channels_last)
    x = x.contiguous()
    _, _, height, width = x.shape
    return x.as_strided(x.shape, (height * width, 1, width, 1))


def stack(members: Sequence[nn.Module]) -> nn.Module | None:
    """One network whose every layer holds all members' layers side by side (see the module docstring).

    Its input is ``(rows, members * C, H, W)`` (member ``i``'s rows in channels ``i * C .. (i + 1) * C``), its output
    ``(rows, members * classes)``.

    Returns:
        The stacked network (weights copied, in eval mode), or ``None`` if a layer is of an unknown type or differs
        between members.
    """
    first = members[0]
    if any(type(member) is not type(first) for member in members):
        return None
    with torch.no_grad():
        if type(first) is nn.Conv2d:
            return _stack_conv(members)
        if type(first) is nn.Linear:
            same_bias = all((member.bias is None) == (first.bias is None) for member in members)
            return _StackedLinear(members) if same_bias and _alike(members, "in_features", "out_features") else None
        if type(first) in (nn.BatchNorm1d, nn.BatchNorm2d):
            return _stack_norm(members)
        if type(first) in (v2.Normalize, transforms.Normalize):
            if any(len(m.mean) != len(first.mean) or len(m.std) != len(first.mean) for m in members):
                return None
            return _Normalize([v for m in members for v in m.mean], [v for m in members for v in m.std])
    if type(first) in _PER_CHANNEL and not first._modules:
        flat = type(first) is not nn.Flatten or (first.start_dim, first.end_dim) == (1, -1)
        return copy.deepcopy(first) if flat and all(m.extra_repr() == first.extra_repr() for m in members) else None
    if not first._modules or any(m._parameters or m._buffers or m._modules.keys() != first._modules.keys()
                                 for m in members):
        return None
    container = copy.copy(first)  # its own forward, over stacked children (checked on the probe batch)
    container._modules = {}
    previous = None
    for name, child in first._modules.items():
        children = [m._modules[name] for m in members]
        if child is None and all(c is None for c in children):  # an optional layer none of them has
            container._modules[name] = previous = None
            continue
        stacked = stack(children) if all(c is not None for c in children) else None
        if stacked is None:
            return None
        if type(first) is nn.Sequential and type(child) is nn.ReLU and type(previous) in _FRESH_OUTPUT:
            stacked = nn.ReLU(inplace=True)  # on the output its predecessor just made: no new buffer to fault in
        container._modules[name], previous = stacked, child
    return container.eval()


class _StackedLinear(nn.Module):
    """Linear layers of several members as one batched product over ``(rows, members * features)``.

    The weights are kept as the layers keep them, ``(out, in)``, and used transposed, as ``F.linear`` does: so a row
    is rounded alike wherever it sits among the rows, and an answer does not change in its last bits with the batch
    it came in (a server answering a batch in parts repeats the in-process answers bit for bit, as the members
    themselves do). Weights stored ``(in, out)`` ahead of time are a little faster, but round some rows by position.
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.members = len(linears)
        self.register_buffer("weight", torch.stack([layer.weight.detach() for layer in linears]))
        has_bias = linears[0].bias is not None
        self.register_buffer("bias", torch.stack([layer.bias.detach() for layer in linears])[:, None] if has_bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"a stacked linear layer takes (rows, members * features), got shape {tuple(x.shape)}")
        rows = x.shape[0]
        per_member = x.view(rows, self.members, -1).transpose(0, 1)
        weight = self.weight.transpose(1, 2)
        out = torch.bmm(per_member, weight) if self.bias is None else torch.baddbmm(self.bias, per_member, weight)
        return out.transpose(0, 1).reshape(rows, -1)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as torchvision's ``Normalize`` computes it (the same operations)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.mean, self.std = list(mean), list(std)

    def forward(self, x: Tensor) -> Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub(mean).div_(std)


def _stack_conv(convs: Sequence[nn.Conv2d]) -> nn.Conv2d | None:
    first = convs[0]
    if not _alike(convs, "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode") or any((c.bias is None) != (first.bias is None) for c in convs):
        return None
    count = len(convs)
    conv = nn.Conv2d(first.in_channels * count, first.out_channels * count, first.kernel_size, first.stride,
                     first.padding, first.dilation, first.groups * count, first.bias is not None, first.padding_mode,
                     device="meta")
    conv.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]), requires_grad=False)
    if first.bias is not None:
        conv.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs]), requires_grad=False)
    return conv


def _stack_norm(norms: Sequence[nn.BatchNorm1d | nn.BatchNorm2d]) -> nn.Module | None:
    first = norms[0]
    if not _alike(norms, "num_features", "eps", "affine") or any(n.running_mean is None for n in norms):
        return None
    norm = type(first)(first.num_features * len(norms), first.eps, affine=first.affine, device="meta").eval()
    for name in ("weight", "bias") if first.affine else ():
        setattr(norm, name, nn.Parameter(torch.cat([getattr(n, name).detach() for n in norms]), requires_grad=False))
    for name in ("running_mean", "running_var"):
        setattr(norm, name, torch.cat([getattr(n, name) for n in norms]))
    norm.num_batches_tracked = first.num_batches_tracked.clone()
    return norm


def _alike(modules: Sequence[nn.Module], *names: str) -> bool:
    return all(getattr(m, name) == getattr(modules[0], name) for m in modules for name in names)


def _hooked(members: Sequence[nn.Module]) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for member in members for m in member.modules())


def _close(got: Tensor, expected: Tensor) -> bool:
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 1e-2
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=tolerance, atol=tolerance)


def _state(weights: Sequence[tuple[dict, str]], hooks: Sequence[dict], modules: Sequence[nn.Module]) -> tuple:
    """Read where the weights and hooks are held: a few microseconds for five LeNet-5, a tenth of walking the modules.

    An edit through ``.data`` (``p.data.mul_(0.5)``) changes neither storage nor version: after one, build the
    victim's forms again (``victim._fused = FusedMembers(victim.members)``) or edit the weights under
    ``torch.no_grad()``, which counts.

    Returns:
        Storage and version of each weight (a new tensor, ``.to()`` or an in-place edit changes them; a weight removed
        reads as missing), the number of forward hooks, and each module's children and training mode (a layer
        replaced, or one put in training mode).
    """
    return (tuple((t.data_ptr(), t._version) if (t := held.get(name, _MISSING)) is not None and t is not _MISSING
                  else t for held, name in weights),
            sum(len(table) for table in hooks),
            tuple((module.training, *map(id, module._modules.values())) for module in modules))
