"""What a defender serves: the victim (members behind a router), its loader, and the output post-processors."""

from edm_lightning.defense.evaluation import CopySpreadModule, DiagnosticsModule, ServedVictimModule, VictimProbe
from edm_lightning.defense.loader import VictimConfig, load_victim
from edm_lightning.defense.postprocessors import (
    POSTPROCESSORS,
    AdaptiveMisinformation,
    Postprocessor,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopLabel,
    build_postprocessors,
)
from edm_lightning.defense.victim import Victim, validate_inputs

__all__ = [
    "POSTPROCESSORS",
    "AdaptiveMisinformation",
    "CopySpreadModule",
    "DiagnosticsModule",
    "Postprocessor",
    "PredictionPoisoning",
    "ReverseSigmoid",
    "Rounding",
    "ServedVictimModule",
    "TopLabel",
    "Victim",
    "VictimConfig",
    "VictimProbe",
    "build_postprocessors",
    "load_victim",
    "validate_inputs",
]
