"""Model-stealing attacks and the oracle they query: KnockoffNets (and its FixMatch clone), JBDA / JBDA-TR, ActiveThief,
DFME, MAZE, DisGUIDE (and any attack registered the same way).

Each attack is a DataModule (the victim behind a :class:`BlackBoxOracle`, the attacker's data, the
evaluation set) and a LightningModule (the attacker's clone and what else it learns), run by
``python main.py fit --config configs/attack/<attack>.yaml`` or from Python by ``run_<attack>(...)``.
Each registers its ``*_job`` function in :data:`ATTACKS` with :func:`register_attack`; every module of
this package is imported here, so a new attack's module is registered without being listed anywhere.
"""

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.dfme import DataFreeDataModule, DFMEModule, dfme_job, run_dfme
from edm_lightning.attacks.jbda import JBDADataModule, JBDAModule, jacobian_augmentation, jbda_job, run_jbda
from edm_lightning.attacks.knockoff import KnockoffDataModule, knockoff_job, run_knockoff
from edm_lightning.attacks.maze import MAZEModule, maze_job, run_maze
from edm_lightning.attacks.oracle import BlackBoxOracle, QueryBudgetExceeded
from edm_lightning.attacks.purchase import Purchase, QueryLedger
from edm_lightning.attacks.registry import ATTACKS, CACHE_DIR, AttackEntry, register_attack
from edm_lightning.attacks.remote import RemoteVictim, RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob, attack_figures, run_attack
from edm_lightning.attacks.transfer_set import TransferSet, build_transfer_set
from edm_lightning.registry import import_plugins

import_plugins(__name__, __path__)  # a module that registers an attack needs no line here

__all__ = [
    "ATTACKS",
    "CACHE_DIR",
    "AttackDataModule",
    "AttackEntry",
    "AttackJob",
    "BlackBoxOracle",
    "DFMEModule",
    "DataFreeDataModule",
    "JBDADataModule",
    "JBDAModule",
    "KnockoffDataModule",
    "MAZEModule",
    "Purchase",
    "QueryBudgetExceeded",
    "QueryLedger",
    "RemoteVictim",
    "RemoteVictimConfig",
    "TransferSet",
    "attack_figures",
    "build_transfer_set",
    "dfme_job",
    "jacobian_augmentation",
    "jbda_job",
    "knockoff_job",
    "maze_job",
    "register_attack",
    "run_attack",
    "run_dfme",
    "run_jbda",
    "run_knockoff",
    "run_maze",
]
