"""Routers: which ensemble member answers each query, deterministically across processes and machines.

- :class:`NeuralHashRouter` (:mod:`.neural`) is the EDM paper's: a small classifier H trained on an auxiliary
  dataset, ``p = softmax(H(x))``, member ``= (m * argmax p + floor((M * max p - 1) * m / (M - 1))) mod N`` with
  ``M = 10``, ``m = 2``. Similar inputs get similar ``p``, hence the same member, so re-sending a query
  with faint noise does not let an attacker average the members' answers.
- :class:`KeyedHashRouter` (:mod:`.keyed`) hashes the quantised input bytes with keyed BLAKE2b: cheap, no
  extra network, unpredictable without the key, but a one-pixel change moves the query to another member.
- :class:`CoarseKeyedHashRouter` (:mod:`.keyed`) hashes, with the same key, a coarse view of the input (cell
  averages on a 4 x 4 grid, 4 grey levels each): nearly as balanced as the keyed hash on data the defender
  never saw, and nearly as stable as the neural one under faint noise, without a hash network to train.
- :class:`AlignedKeyedHashRouter` (:mod:`.keyed`) hashes the coarse view of the image moved so that its ink is
  centred (3 x 3 cells inside a 4-pixel margin): a shifted re-query mostly keeps its member.
- :class:`FixedRouter` (:mod:`.base`) always picks one member (the undefended case).

None of them uses Python's ``hash()``, which is salted per process. Routers are plain modules below the
training code: :class:`~edm_lightning.models.EnsembleModule` measures its routed accuracy with them and
:class:`~edm_lightning.defense.Victim` serves with them. Each registers itself in :data:`ROUTERS` and says
what it is (keyed, needs a hash network, exportable) as class attributes; the keys are in :mod:`.keys`.
Every module of this package is imported here, so a new router's module is registered without a line here.
"""

from edm_lightning.registry import import_plugins
from edm_lightning.routing.base import (
    ROUTERS,
    FixedRouter,
    Router,
    RouterConfig,
    answer_routed,
    build_router,
    plain_router,
    router_class,
    router_label,
    router_spec,
)
from edm_lightning.routing.keyed import (
    AlignedKeyedHashRouter,
    CoarseKeyedHashRouter,
    KeyedHashRouter,
    keyed_members,
    quantise,
)
from edm_lightning.routing.keys import (
    DEFAULT_ROUTER_KEY,
    ROUTER_KEY_ENV,
    ROUTER_KEY_FILE_ENV,
    SECRET_MASK,
    PublicRouterKeyWarning,
    as_secret,
    check_key_fingerprint,
    key_fingerprint,
    resolve_router_key,
)
from edm_lightning.routing.neural import (
    BALANCE_KEY,
    NeuralHashRouter,
    balance_logit_bias,
    load_hash_net,
    neural_hash_index,
)

import_plugins(__name__, __path__)  # a module that registers a router needs no line here

__all__ = [
    "BALANCE_KEY",
    "DEFAULT_ROUTER_KEY",
    "ROUTERS",
    "ROUTER_KEY_ENV",
    "ROUTER_KEY_FILE_ENV",
    "SECRET_MASK",
    "AlignedKeyedHashRouter",
    "CoarseKeyedHashRouter",
    "FixedRouter",
    "KeyedHashRouter",
    "NeuralHashRouter",
    "PublicRouterKeyWarning",
    "Router",
    "RouterConfig",
    "answer_routed",
    "as_secret",
    "balance_logit_bias",
    "build_router",
    "check_key_fingerprint",
    "key_fingerprint",
    "keyed_members",
    "load_hash_net",
    "neural_hash_index",
    "plain_router",
    "quantise",
    "resolve_router_key",
    "router_class",
    "router_label",
    "router_spec",
]
