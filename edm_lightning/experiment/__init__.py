"""The experiment runner: one command from data to the results table (``python -m edm_lightning.experiment``)."""

from edm_lightning.experiment.config import (
    AttackConfig,
    BenignCorruption,
    DefenseConfig,
    DetectorSetup,
    EDMConfig,
    ExperimentConfig,
    HashNetConfig,
    TrainConfig,
)
from edm_lightning.experiment.plan import Plan, Stage, build_plan
from edm_lightning.experiment.runner import run_experiment

__all__ = ["AttackConfig", "BenignCorruption", "DefenseConfig", "DetectorSetup", "EDMConfig", "ExperimentConfig",
           "HashNetConfig", "Plan", "Stage", "TrainConfig", "build_plan", "run_experiment"]
