"""The router contract, its registry, and how a config names a router (a name, or ``class_path`` / ``init_args``).

A router kind is one class: registered with ``@ROUTERS.register("name")``, it declares what the rest of
the package needs to know of it as class attributes (:class:`Router`: ``keyed``, ``needs_hash_network``,
``exportable``), and its own settings are its init arguments, which a config sets as
``{class_path: coarse, init_args: {grid: 5, levels: 4}}`` (the form LightningCLI and post-processors use).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from jsonargparse.typing import SecretStr, register_type
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.errors import ConfigError
from edm_lightning.registry import Registry

__all__ = ["ROUTERS", "SUPPLIED", "FixedRouter", "FusedRun", "Router", "RouterConfig", "answer_routed", "build_router",
           "check_members", "member_counts", "plain_router", "routed_logits", "router_class", "router_label", "router_spec"]

#: Every router kind by the name configs use; each class registers itself where it is defined.
ROUTERS: Registry[type[Router]] = Registry("router")

#: Init arguments the victim supplies to a router (not settable from ``init_args``).
SUPPLIED = frozenset({"num_members", "member", "key", "hash_net", "logit_bias"})


class Router(nn.Module):
    """Maps a batch of inputs ``(N, C, H, W)`` to member indices ``(N,)`` in ``[0, num_members)``.

    A router must be deterministic and batch-independent: an input gets the same member whatever else
    is in its batch, in any process, on any machine. What the rest of the package needs to know of a router
    kind, it asks the class, never its name:

    Attributes:
        keyed: a secret key decides the routes (resolved by :func:`~edm_lightning.routing.resolve_router_key`,
            fingerprinted in configs, never written; stages behind it are keyed by it).
        needs_hash_network: built from a hash-network checkpoint (``hash_checkpoint``), which the experiment
            runner trains (``configs/hashnet.yaml``).
        exportable: :meth:`export_route` gives the same routes in tensor operations (ONNX, ``torch.export``).
    """

    num_members: int
    keyed: ClassVar[bool] = False
    needs_hash_network: ClassVar[bool] = False
    exportable: ClassVar[bool] = False

    @override
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def export_route(self, x: Tensor) -> Tensor:
        """The routes of ``x`` ``(N, C, H, W)`` in tensor operations only, for an exported graph.

        Returns:
            Member indices ``(N,)``.

        Raises:
            NotImplementedError: the router has no such form (``exportable`` is false).
        """
        raise NotImplementedError(f"{type(self).__name__} has no exportable form")

    @classmethod
    def from_config(cls, num_members: int, *, member: int = 0, key: str | bytes | SecretStr | None = None,
                    hash_checkpoint: str | None = None, input_shape: tuple[int, int, int] | None = None,
                    ensemble_data: str | None = None, **options: Any) -> Router:
        """The router a config names: what the victim supplies (members, key, hash network), and ``options``, the
        router's own init arguments (:meth:`options`) from the config's ``init_args``.

        Returns:
            The router.
        """
        return cls(num_members, **options)

    @classmethod
    def options(cls) -> list[str]:
        """The init arguments a config may set (``init_args``): all but what the victim supplies.

        Returns:
            Their names, in the signature's order.
        """
        return [name for name in inspect.signature(cls.__init__).parameters if name not in SUPPLIED and name != "self"]


@ROUTERS.register("fixed")
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

    exportable = True

    @override
    def forward(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), self.member, dtype=torch.long, device=x.device)

    @override
    def export_route(self, x: Tensor) -> Tensor:
        return torch.full_like(x[:, 0, 0, 0], self.member, dtype=torch.long)

    @classmethod
    def from_config(cls, num_members: int, *, member: int = 0, **supplied: Any) -> FixedRouter:
        """Always ``member`` (the victim's ``member``), whatever else the victim supplies.

        Returns:
            The router.
        """
        return cls(num_members, member)


#: A stacked form of the members: ``(x, route, counts) -> logits (N, classes)`` in ``x``'s row order, or ``None``.
FusedRun = Callable[[Tensor, Tensor, Sequence[int]], "Tensor | None"]


def answer_routed(members: Sequence[nn.Module], route: Tensor, x: Tensor, num_classes: int,
                  fused: FusedRun | None = None) -> Tensor:
    """Softmax of each input's routed member: probabilities ``(N, num_classes)`` for ``x`` ``(N, C, H, W)``.

    Each member runs only on the inputs routed to it, so a batch costs about one member, not N (see
    :func:`routed_logits`); one softmax and one finiteness check then serve the whole batch. ``fused``, when given
    (the victim's stacked members, :class:`~edm_lightning.defense.fused.FusedMembers`), computes the same logits in
    fewer calls, or returns ``None`` to leave the batch to the per-member loop.

    Returns:
        Probabilities ``(N, num_classes)`` in ``x``'s dtype.

    Raises:
        RuntimeError: a member produced non-finite values (a broken model must not answer NaN; the first such member
            is named), answers of another length than ``num_classes``, or a route outside ``[0, len(members))``.
    """
    if x.shape[0] == 0:
        return x.new_empty((0, num_classes))
    counts = member_counts(route, len(members))
    logits = fused(x, route, counts) if fused is not None else None
    if logits is None:
        logits = routed_logits(members, route, x, counts)
    if logits.shape != (x.shape[0], num_classes):
        raise RuntimeError(f"the members answered shape {tuple(logits.shape)} for {x.shape[0]} queries, expected "
                           f"{num_classes} classes each")
    probs = logits.softmax(dim=-1).to(x.dtype)
    if not bool(probs.isfinite().all()):  # one check for the batch; the member is found only when one failed
        broken = ~probs.isfinite().all(dim=-1)
        index = int(route[broken].min())
        bad = int((broken & (route == index)).sum())
        raise RuntimeError(f"member {index} produced non-finite answers for {bad} of its {counts[index]} queries: "
                           "the model is broken (check its checkpoint); refusing to serve them")
    return probs


def member_counts(route: Tensor, num_members: int) -> list[int]:
    """How many rows each member answers (one host sync for the batch).

    Returns:
        ``num_members`` counts.

    Raises:
        RuntimeError: a route outside ``[0, num_members)`` (a router that breaks its contract).
    """
    try:
        counts = torch.bincount(route, minlength=num_members).tolist()
    except RuntimeError:  # a negative index
        counts = []
    if len(counts) != num_members:
        raise RuntimeError(f"the router sent queries to members {sorted(set(route.tolist()))}, outside "
                           f"[0, {num_members})")
    return counts


def routed_logits(members: Sequence[nn.Module], route: Tensor, x: Tensor, counts: Sequence[int],
                  layout: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Each row's routed member's logits, in ``x``'s row order: the rows are sorted by member once, each member answers
    its own run of rows (a member that answers the whole batch answers it as it is), and one scatter puts them back.

    Args:
        members: the members.
        route: member index of each row ``(N,)``.
        x: inputs ``(N, ...)``, at least one row.
        counts: rows per member (:func:`member_counts`).
        layout: applied to the rows before the members see them (a memory format), or ``None``.

    Returns:
        Logits ``(N, classes)``.
    """
    layout = layout or (lambda rows: rows)
    busy = [index for index, count in enumerate(counts) if count]
    if len(busy) == 1:  # a fixed router, a single member, or a batch that one member answers alone
        return members[busy[0]](layout(x))
    order = torch.argsort(route, stable=True)
    parts = layout(x.index_select(0, order)).split(list(counts))  # index_select: x[order] is 10x slower for images
    answers = torch.cat([members[index](parts[index]) for index in busy])
    return torch.empty_like(answers).index_copy_(0, order, answers)


class RouterConfig:
    """A router with its own settings, as configs write it: ``{class_path: <name>, init_args: {...}}``.

    Registered as a jsonargparse type, so such a mapping is read as a router, not as a class to instantiate, and an
    unknown router or an init argument it does not take fails while the config is parsed. Configs type a router as
    ``str | RouterConfig`` (a list of them as ``list[RouterConfig]``, which also reads names); the classes that take
    one keep it as :func:`plain_router` gives it.

    Args:
        class_path: a registered router's name.
        init_args: its own init arguments (:meth:`Router.options`).
    """

    def __init__(self, class_path: str, init_args: Mapping[str, Any] | None = None):
        self.class_path, self.init_args = class_path, dict(init_args or {})

    @classmethod
    def parse(cls, value: Any) -> RouterConfig:
        """The checked router, from a name, a ``{class_path, init_args}`` mapping or a :class:`RouterConfig`.

        Returns:
            The router config.

        Raises:
            ConfigError: see :func:`router_spec`.
        """
        name, options = router_spec(value)
        return cls(name, options)

    def as_dict(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``, as configs write it."""
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}

    def plain(self) -> str | dict[str, Any]:
        """The name alone when there are no settings (as configs always named routers), else :meth:`as_dict`."""
        return self.as_dict() if self.init_args else self.class_path

    def __repr__(self) -> str:
        return f"RouterConfig({self.class_path!r}, {self.init_args!r})"


register_type(RouterConfig, serializer=RouterConfig.plain, deserializer=RouterConfig.parse,
              deserializer_exceptions=(ConfigError, ValueError, TypeError))


def plain_router(router: str | Mapping[str, Any] | RouterConfig) -> str | dict[str, Any]:
    """A router as plain data: its name when it has no settings of its own (as configs always named routers, so stage
    keys and cache names stay), else ``{class_path, init_args}``.

    Returns:
        The name, or the mapping.

    Raises:
        ConfigError: see :func:`router_spec`.
    """
    return RouterConfig.parse(router).plain()


def router_spec(router: str | Mapping[str, Any] | RouterConfig) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of a router as configs write it: a registered name, or ``{class_path: <name>, init_args: {...}}``.

    Returns:
        The registered name and the router's own init arguments (empty for a bare name).

    Raises:
        ConfigError: neither form, an unknown name (the known ones listed), or options the router does not take.

    Example:
        >>> router_spec({"class_path": "coarse", "init_args": {"grid": 5}})
        ('coarse', {'grid': 5})
        >>> router_spec("keyed")
        ('keyed', {})
    """
    if isinstance(router, RouterConfig):
        router = router.as_dict()
    if isinstance(router, str):
        name, options = router, {}
    elif (isinstance(router, Mapping) and isinstance(router.get("class_path"), str)
          and set(router) <= {"class_path", "init_args"} and isinstance(router.get("init_args") or {}, Mapping)):
        name, options = router["class_path"], dict(router.get("init_args") or {})
    else:
        raise ConfigError(f"a router is a name ({', '.join(ROUTERS.names())}) or {{class_path: <name>, init_args: {{...}}}}, "
                          f"got {router!r}")
    cls = ROUTERS.get(name)
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise ConfigError(f"router {name!r} ({cls.__name__}) takes no init_args {unknown}; it takes: "
                          f"{', '.join(cls.options()) or 'none'}")
    return name, options


def router_class(router: str | Mapping[str, Any]) -> type[Router]:
    """The class of a router as configs write it (see :func:`router_spec`): ask it ``keyed``, ``exportable``...

    Returns:
        The registered router class.
    """
    return ROUTERS.get(router_spec(router)[0])


def router_label(router: str | Mapping[str, Any]) -> str:
    """A router's name in results and stage labels: its name, with its options when it has any.

    Returns:
        ``coarse``, or ``coarse(grid=5,levels=4)``.

    Example:
        >>> router_label({"class_path": "coarse", "init_args": {"levels": 4, "grid": 5}})
        'coarse(grid=5,levels=4)'
    """
    name, options = router_spec(router)
    return name + (f"({','.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")


def build_router(
    kind: str | Mapping[str, Any],
    num_members: int,
    *,
    member: int = 0,
    key: str | bytes | SecretStr | None = None,
    hash_checkpoint: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    ensemble_data: str | None = None,
) -> Router:
    """The router a config names (:func:`router_spec`): ``fixed`` (``member``), ``neural`` (``hash_checkpoint``),
    ``keyed``, ``coarse`` or ``aligned`` (``key``), or any registered kind, with its ``init_args``.

    ``input_shape``, when given, is checked against the hash network's, so a hash net trained for other
    inputs fails here rather than at the first query; ``ensemble_data`` (the ensemble's training dataset),
    when given, must not be the hash network's (see :func:`~edm_lightning.routing.load_hash_net`).

    Returns:
        The router.

    Raises:
        ConfigError: an unknown ``kind`` (the known ones listed), options it does not take or cannot use, or
            settings that kind cannot use.
    """
    name, options = router_spec(kind)
    try:
        return ROUTERS.get(name).from_config(num_members, member=member, key=key, hash_checkpoint=hash_checkpoint,
                                             input_shape=input_shape, ensemble_data=ensemble_data, **options)
    except TypeError as err:  # a value of a type the router cannot use
        raise ConfigError(f"router {router_label(kind)!r}: {err}") from None


def check_members(num_members: int) -> None:
    """Refuse fewer than one member.

    Raises:
        ConfigError: ``num_members < 1``.
    """
    if num_members < 1:
        raise ConfigError(f"num_members must be >= 1, got {num_members}")
