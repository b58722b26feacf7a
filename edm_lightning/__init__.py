"""EDM-Lightning: the Ensemble of Diverse Models defense against model stealing (Kariyappa et al., ICLR 2021).

The public API, importable from here (each loaded on first use, so ``import edm_lightning`` stays cheap)::

    from edm_lightning import VictimConfig, run_knockoff
    victim = VictimConfig("runs/edm/checkpoints/best.ckpt", router="neural",
                          hash_checkpoint="runs/hashnet/checkpoints/best.ckpt").build()
    probabilities = victim(images)                     # (N, 1, 28, 28) in [0, 1] -> (N, 10)
    figures = run_knockoff(VictimConfig("runs/baseline/checkpoints/best.ckpt"), budget=20_000, max_epochs=5)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("edm-lightning")  # single source: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: Public name -> the module that defines it.
_API = {
    "Victim": "edm_lightning.defense",
    "VictimConfig": "edm_lightning.defense",
    "load_victim": "edm_lightning.defense",
    "Postprocessor": "edm_lightning.defense",
    "TopLabel": "edm_lightning.defense",
    "Rounding": "edm_lightning.defense",
    "ReverseSigmoid": "edm_lightning.defense",
    "PredictionPoisoning": "edm_lightning.defense",
    "AdaptiveMisinformation": "edm_lightning.defense",
    "KeyedHashRouter": "edm_lightning.routing",
    "AlignedKeyedHashRouter": "edm_lightning.routing",
    "CoarseKeyedHashRouter": "edm_lightning.routing",
    "NeuralHashRouter": "edm_lightning.routing",
    "FixedRouter": "edm_lightning.routing",
    "ROUTERS": "edm_lightning.routing",
    "ATTACKS": "edm_lightning.attacks",
    "register_attack": "edm_lightning.attacks",
    "BlackBoxOracle": "edm_lightning.attacks",
    "QueryBudgetExceeded": "edm_lightning.attacks",
    "run_knockoff": "edm_lightning.attacks",
    "run_jbda": "edm_lightning.attacks",
    "run_dfme": "edm_lightning.attacks",
    "run_maze": "edm_lightning.attacks",
    "RemoteVictimConfig": "edm_lightning.attacks",
    "EnsembleModule": "edm_lightning.models",
    "ClassifierModule": "edm_lightning.models",
    "CloneModule": "edm_lightning.models",
    "MixtureCloneModule": "edm_lightning.models",
    "export_victim": "edm_lightning.export",
    "run_experiment": "edm_lightning.experiment",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    # PEP 562: the public names load their module on first use (torch and Lightning are not imported by
    # `import edm_lightning`, and no submodule's import goes through this file's).
    if name not in _API:
        raise AttributeError(f"module 'edm_lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
