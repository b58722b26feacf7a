"""What a defender serves: routing over ensemble members, output post-processors, the DefendedModel."""

from edm_lightning.defense.defended import DefendedModel, FixedRouter, Router, validate_inputs
from edm_lightning.defense.postprocess import (
    AdaptiveMisinformation,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopLabel,
    build_postprocessors,
)
from edm_lightning.defense.routing import KeyedHashRouter, NeuralHashRouter, build_router
from edm_lightning.defense.victim import VictimConfig, load_defended

__all__ = [
    "AdaptiveMisinformation",
    "DefendedModel",
    "FixedRouter",
    "KeyedHashRouter",
    "NeuralHashRouter",
    "PredictionPoisoning",
    "ReverseSigmoid",
    "Rounding",
    "Router",
    "TopLabel",
    "VictimConfig",
    "build_postprocessors",
    "build_router",
    "load_defended",
    "validate_inputs",
]
