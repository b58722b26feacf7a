"""The experiment runner: one command from data to the results table (``python -m edm_lightning.experiment``)."""

from edm_lightning.experiment.config import (
    AttackSpec,
    DefenseSpec,
    EDMSpec,
    ExperimentConfig,
    HashNetSpec,
    TrainSpec,
)
from edm_lightning.experiment.plan import Plan, Stage, build_plan
from edm_lightning.experiment.runner import run_experiment

__all__ = ["AttackSpec", "DefenseSpec", "EDMSpec", "ExperimentConfig", "HashNetSpec", "Plan", "Stage", "TrainSpec",
           "build_plan", "run_experiment"]
