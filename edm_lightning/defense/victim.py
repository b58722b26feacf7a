"""Building the served model from checkpoints: the one way attacks and evaluations get a victim."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edm_lightning.defense.defended import DefendedModel, FixedRouter

__all__ = ["VictimConfig", "load_defended"]


@dataclass
class VictimConfig:
    """The model an oracle serves, as configs name it.

    Args:
        checkpoint: a target (``ClassifierModule``) or EDM ensemble checkpoint.
        router: how an ensemble picks the answering member: ``fixed`` (always ``member``), ``neural``
            (the paper's hash network) or ``keyed`` (keyed hash of the quantised input).
        hash_checkpoint: the hash network's checkpoint, for ``router: neural``.
        key: secret key of the ``keyed`` router.
        member: the member that answers under ``router: fixed``.
    """

    checkpoint: str
    router: str = "fixed"
    hash_checkpoint: str | None = None
    key: str = "edm-lightning"
    member: int = 0

    def build(self) -> DefendedModel:
        return load_defended(self)


def load_defended(config: VictimConfig) -> DefendedModel:
    """A DefendedModel in eval mode on CPU from ``config``; unreadable or foreign checkpoints fail clearly."""
    from edm_lightning.models.classifier import ClassifierModule

    path = Path(config.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Victim checkpoint {str(path)!r} does not exist. Train it first (python main.py fit --config ...).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"Victim checkpoint {str(path)!r} is not a readable Lightning checkpoint: {err}") from None
    hparams = state.get("hyper_parameters", {})
    if "arch" in hparams and "num_members" not in hparams:
        module = ClassifierModule.load_from_checkpoint(path, map_location="cpu")
        if config.router != "fixed" or config.member != 0:
            raise ValueError(
                f"{str(path)!r} is a single-model checkpoint: router must be 'fixed' with member 0, "
                f"got router={config.router!r}, member={config.member}"
            )
        hp = module.hparams
        model = DefendedModel([module.net], FixedRouter(1), hp.input_shape, hp.num_classes)
        return model.eval()
    raise ValueError(f"{str(path)!r} is not a target checkpoint (hyper-parameters: {sorted(hparams)})")
