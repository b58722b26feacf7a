"""LightningModules: training logic only; the nets they train live in :mod:`edm_lightning.nets`."""

from edm_lightning.models.classifier import ClassifierModule
from edm_lightning.models.clone import CloneModule
from edm_lightning.models.ensemble import EnsembleModule
from edm_lightning.models.misinformation import MisinformationModule
from edm_lightning.models.mixture_clone import MixtureCloneModule
from edm_lightning.models.semi_supervised_clone import SemiSupervisedCloneModule
from edm_lightning.models.synthesis import Synthesis
from edm_lightning.optim import OptimConfig

__all__ = ["ClassifierModule", "CloneModule", "EnsembleModule", "MisinformationModule", "MixtureCloneModule", "OptimConfig",
           "SemiSupervisedCloneModule", "Synthesis"]
