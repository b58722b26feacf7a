"""Tiny settings of every registered attack, for the tests parametrised from the registry.

A newly registered attack needs an entry here (a test says so); nothing else in the tests names attacks.
"""

#: Job arguments of each registered attack on tiny data (besides the victim, dataset, root and cache).
TINY_ATTACKS = {
    "activethief": dict(budget=200, initial_size=40, rounds=2, epochs_per_round=1, batch_size=32, strategy="kcenter"),
    "knockoff": dict(budget=320, batch_size=64, query_batch_size=64, max_epochs=1),
    "jbda": dict(seed_size=40, rounds=2, epochs_per_round=1, batch_size=32, budget=160),
    "jbda_tr": dict(seed_size=40, rounds=2, epochs_per_round=1, batch_size=32, budget=160),
    "dfme": dict(budget=300, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, latent_dim=16),
    "maze": dict(budget=400, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, directions=2, replay_steps=3,
                 latent_dim=16),
}


def tiny_settings(name: str) -> dict:
    """The tiny settings of attack ``name`` (a copy).

    Raises:
        AssertionError: the attack has none yet (add them to :data:`TINY_ATTACKS`).
    """
    assert name in TINY_ATTACKS, f"attack {name!r} is registered but has no tiny settings in tests/helpers/attacks.py"
    return dict(TINY_ATTACKS[name])
