"""Model-stealing attacks and the oracle they query: KnockoffNets, JBDA / JBDA-TR, DFME."""

from edm_lightning.attacks.base import AttackDataModule, run_attack
from edm_lightning.attacks.knockoff import KnockoffDataModule, build_transfer_set, run_knockoff
from edm_lightning.attacks.oracle import BlackBoxOracle, QueryBudgetExceeded

__all__ = [
    "AttackDataModule",
    "BlackBoxOracle",
    "KnockoffDataModule",
    "QueryBudgetExceeded",
    "build_transfer_set",
    "run_attack",
    "run_knockoff",
]
