"""Model-stealing attacks and the oracle they query: KnockoffNets, JBDA / JBDA-TR, DFME, MAZE.

Each attack is a DataModule (the victim behind a :class:`BlackBoxOracle`, the attacker's data, the
evaluation set) and a LightningModule (the attacker's clone and what else it learns), run by
``python main.py fit --config configs/attack/<attack>.yaml`` or from Python by ``run_<attack>(...)``.
"""

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.dfme import DataFreeDataModule, DFMEModule, run_dfme
from edm_lightning.attacks.jbda import JBDADataModule, JBDAModule, jacobian_augmentation, run_jbda
from edm_lightning.attacks.knockoff import KnockoffDataModule, build_transfer_set, run_knockoff
from edm_lightning.attacks.maze import MAZEModule, run_maze
from edm_lightning.attacks.oracle import BlackBoxOracle, QueryBudgetExceeded
from edm_lightning.attacks.remote import RemoteVictim, RemoteVictimConfig
from edm_lightning.attacks.run import run_attack

__all__ = [
    "AttackDataModule",
    "BlackBoxOracle",
    "DFMEModule",
    "DataFreeDataModule",
    "JBDADataModule",
    "JBDAModule",
    "KnockoffDataModule",
    "MAZEModule",
    "QueryBudgetExceeded",
    "RemoteVictim",
    "RemoteVictimConfig",
    "build_transfer_set",
    "jacobian_augmentation",
    "run_attack",
    "run_dfme",
    "run_jbda",
    "run_knockoff",
    "run_maze",
]
