"""The experiment runner: one command from data to the results table (``python -m edm_lightning.experiment``)."""

from edm_lightning.experiment.runner import (
    AttackSpec,
    DefenseSpec,
    EDMSpec,
    ExperimentConfig,
    HashNetSpec,
    TrainSpec,
    run_experiment,
)

__all__ = ["AttackSpec", "DefenseSpec", "EDMSpec", "ExperimentConfig", "HashNetSpec", "TrainSpec", "run_experiment"]
