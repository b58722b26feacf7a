"""A tiny experiment configuration: every stage kind, seconds per stage on the synthetic data root."""

from __future__ import annotations

from pathlib import Path

from edm_lightning.experiment import AttackConfig, EDMConfig, ExperimentConfig, HashNetConfig, TrainConfig


def tiny_config(root: Path, out: Path, **overrides) -> ExperimentConfig:
    config = ExperimentConfig(
        name="tiny", dataset="fashionmnist", root=str(root), seeds=[0], test_size=40, wandb_project=None,
        runs_dir=str(out / "runs"), results_dir=str(out / "results"),
        target=TrainConfig(epochs=1, batch_size=32, val_size=40), hashnet=HashNetConfig(epochs=1, batch_size=32, val_size=40),
        edm=EDMConfig(epochs=1, batch_size=32, val_size=40, num_members=2, diversity_weight=0.5, tradeoff_weights=[0.0]),
        attacks=[AttackConfig(name="knockoff", budgets=[64, 128], epochs=1, options={"batch_size": 32})],
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
