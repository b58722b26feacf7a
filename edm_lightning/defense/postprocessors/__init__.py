"""Output-perturbation defenses, one file each, composed after routing (see :mod:`.base` for the contract).

Every module of this package is imported here, so a new defense's module is registered without a line here.
"""

from edm_lightning.defense.postprocessors.adaptive_misinformation import AdaptiveMisinformation
from edm_lightning.defense.postprocessors.base import (
    POSTPROCESSORS,
    Postprocessor,
    PostprocessorConfig,
    build_postprocessor,
    build_postprocessors,
    resolve_postprocessor,
)
from edm_lightning.defense.postprocessors.prediction_poisoning import PredictionPoisoning, mad_target
from edm_lightning.defense.postprocessors.reverse_sigmoid import ReverseSigmoid
from edm_lightning.defense.postprocessors.rounding import Rounding
from edm_lightning.defense.postprocessors.top_label import TopLabel
from edm_lightning.registry import import_plugins

import_plugins(__name__, __path__)  # a module that registers a defense needs no line here

__all__ = [
    "POSTPROCESSORS",
    "AdaptiveMisinformation",
    "Postprocessor",
    "PostprocessorConfig",
    "PredictionPoisoning",
    "ReverseSigmoid",
    "Rounding",
    "TopLabel",
    "build_postprocessor",
    "build_postprocessors",
    "mad_target",
    "resolve_postprocessor",
]
