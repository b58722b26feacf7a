"""Model-stealing attacks and the oracle they query: KnockoffNets, JBDA / JBDA-TR, DFME, MAZE.

Each attack is a DataModule (the victim behind a :class:`BlackBoxOracle`, the attacker's data, the
evaluation set) and a LightningModule (the attacker's clone and what else it learns), run by
``python main.py fit --config configs/attack/<attack>.yaml`` or from Python by ``run_<attack>(...)``.
"""

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.dfme import DataFreeDataModule, DFMEModule, dfme_job, run_dfme
from edm_lightning.attacks.jbda import JBDADataModule, JBDAModule, jacobian_augmentation, jbda_job, run_jbda
from edm_lightning.attacks.knockoff import (
    CopySpreadModule,
    KnockoffDataModule,
    build_transfer_set,
    knockoff_job,
    run_knockoff,
)
from edm_lightning.attacks.maze import MAZEModule, maze_job, run_maze
from edm_lightning.attacks.oracle import BlackBoxOracle, QueryBudgetExceeded
from edm_lightning.attacks.remote import RemoteVictim, RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob, attack_figures, run_attack

__all__ = [
    "AttackDataModule",
    "AttackJob",
    "BlackBoxOracle",
    "CopySpreadModule",
    "DFMEModule",
    "DataFreeDataModule",
    "JBDADataModule",
    "JBDAModule",
    "KnockoffDataModule",
    "MAZEModule",
    "QueryBudgetExceeded",
    "RemoteVictim",
    "RemoteVictimConfig",
    "attack_figures",
    "build_transfer_set",
    "dfme_job",
    "jacobian_augmentation",
    "jbda_job",
    "knockoff_job",
    "maze_job",
    "run_attack",
    "run_dfme",
    "run_jbda",
    "run_knockoff",
    "run_maze",
]
