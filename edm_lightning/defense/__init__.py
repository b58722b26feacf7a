"""What a defender serves: routing over ensemble members, output post-processors, the DefendedModel."""

from edm_lightning.defense.defended import DefendedModel, FixedRouter, Router, validate_inputs
from edm_lightning.defense.routing import KeyedHashRouter, NeuralHashRouter, build_router
from edm_lightning.defense.victim import VictimConfig, load_defended

__all__ = [
    "DefendedModel",
    "FixedRouter",
    "KeyedHashRouter",
    "NeuralHashRouter",
    "Router",
    "VictimConfig",
    "build_router",
    "load_defended",
    "validate_inputs",
]
