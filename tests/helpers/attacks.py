"""Tiny settings of every registered attack, for the tests parametrised from the registry, and the checks the attacks
that buy in rounds share.

A newly registered attack needs an entry in :data:`TINY_ATTACKS` (a test says so).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edm_lightning.errors import ConfigError
from tests.helpers.victims import EVAL_SIZE, CountingVictim, linear_victim

#: Job arguments of each registered attack on tiny data (besides the victim, dataset, root and cache).
TINY_ATTACKS = {
    "activethief": dict(budget=200, initial_size=40, rounds=2, epochs_per_round=1, batch_size=32, strategy="kcenter"),
    "knockoff": dict(budget=320, batch_size=64, query_batch_size=64, max_epochs=1),
    "ddae": dict(budget=320, batch_size=32, query_batch_size=64, max_epochs=1, share=0.2, probes=48, shadows=3,
                 held_out=1, shadow_epochs=1, edm_members=2, pool_images=60, kit_steps=20),
    "knockoff_fixmatch": dict(budget=160, batch_size=32, query_batch_size=32, max_epochs=1, mu=2, tau=0.5),
    "jbda": dict(seed_size=40, rounds=2, epochs_per_round=1, batch_size=32, budget=160),
    "jbda_tr": dict(seed_size=40, rounds=2, epochs_per_round=1, batch_size=32, budget=160),
    "dfme": dict(budget=300, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, latent_dim=16),
    "maze": dict(budget=400, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, directions=2, replay_steps=3,
                 latent_dim=16),
    "disguide": dict(budget=160, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, replay_steps=2,
                     latent_dim=16),
}


def tiny_settings(name: str) -> dict:
    """The tiny settings of attack ``name`` (a copy).

    Raises:
        AssertionError: the attack has none yet (add them to :data:`TINY_ATTACKS`).
    """
    assert name in TINY_ATTACKS, f"attack {name!r} is registered but has no tiny settings in tests/helpers/attacks.py"
    return dict(TINY_ATTACKS[name])


def assert_a_damaged_round_is_refused(datamodule_class: type, settings: dict, cache: Path, prefix: str,
                                      change: Callable[[object], object]) -> None:
    """Buy round 0 (``<cache>/<prefix>-*-round0.pt``), damage its file with ``change``, and check that the next run
    refuses it by name before asking the victim anything (only the evaluation labels are computed)."""
    datamodule_class(CountingVictim(linear_victim()), **settings).setup("fit")
    (path,) = cache.glob(f"{prefix}-*-round0.pt")
    torch.save(change(torch.load(path, weights_only=True)), path)
    victim = CountingVictim(linear_victim())
    with pytest.raises(ConfigError, match=rf"{path.name}.*delete it only to start the attack over"):
        datamodule_class(victim, **settings).setup("fit")
    assert victim.rows == EVAL_SIZE
