"""What a defender serves: routing over ensemble members, output post-processors, the DefendedModel."""

from edm_lightning.defense.defended import DefendedModel, FixedRouter, Router, validate_inputs
from edm_lightning.defense.victim import VictimConfig, load_defended

__all__ = ["DefendedModel", "FixedRouter", "Router", "VictimConfig", "load_defended", "validate_inputs"]
