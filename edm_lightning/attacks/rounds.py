"""Attacks that buy in rounds: the clone trains ``epochs_per_round`` epochs, then the attack buys the next round.

JBDA grows its substitute set by Jacobian steps from what it bought, ActiveThief picks the next pool images with the
clone so far: both train ``(rounds + 1) * epochs_per_round`` epochs on a training set that grows between rounds, and
both query inside the training loop (one process only). :class:`RoundsCloneModule` is that loop; a subclass says how
the next round is bought (:meth:`~RoundsCloneModule.buy_round`) and how large the set is (:meth:`~RoundsCloneModule.sizes`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from typing_extensions import override

from edm_lightning.attacks.run import require_single_process
from edm_lightning.errors import ConfigError
from edm_lightning.models.clone import CloneModule

__all__ = ["RoundsCloneModule"]


class RoundsCloneModule(CloneModule):
    """A clone that buys another round of answers every ``epochs_per_round`` epochs (``self.hparams.rounds`` rounds).

    The clone's accuracy and agreement at the end of every round are logged (``<name>/round_acc``, ``<name>/round``)
    and kept in ``history`` with the set's size.

    Attributes:
        attack_name: the attack's name in messages and logged keys (``JBDA``).
    """

    attack_name: ClassVar[str]

    @override
    def on_fit_start(self) -> None:
        require_single_process(self.trainer, self.attack_name)
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, self.datamodule_type()):
            raise TypeError(f"{type(self).__name__} needs a {self.datamodule_type().__name__}, got {type(datamodule).__name__}")
        hp = self.hparams
        needed = (hp.rounds + 1) * hp.epochs_per_round
        if self.trainer.max_epochs is not None and 0 < self.trainer.max_epochs < needed:
            raise ConfigError(
                f"{self.attack_name} with rounds={hp.rounds} and epochs_per_round={hp.epochs_per_round} trains {needed} "
                f"epochs; trainer.max_epochs={self.trainer.max_epochs} would stop it early. Set max_epochs: {needed}."
            )
        self.trainer.reload_dataloaders_every_n_epochs = 1  # the training set grows between rounds

    @override
    def on_train_epoch_end(self) -> None:
        hp = self.hparams
        if (self.current_epoch + 1) % hp.epochs_per_round:
            return
        round_ = (self.current_epoch + 1) // hp.epochs_per_round - 1
        datamodule = self.trainer.datamodule
        metrics = self.trainer.callback_metrics
        entry: dict[str, Any] = {"round": round_, **self.sizes(datamodule)}
        for key in ("acc", "agreement"):
            if f"val/{key}" in metrics:
                entry[key] = float(metrics[f"val/{key}"])
        self.history.append(entry)
        prefix = self.attack_name.lower().replace("-", "_")
        if "acc" in entry:
            self.log(f"{prefix}/round_acc", entry["acc"])
        self.log(f"{prefix}/round", float(round_))
        if round_ < hp.rounds:
            self.buy_round(round_ + 1, datamodule)

    def datamodule_type(self) -> type[L.LightningDataModule]:  # pragma: no cover - interface
        """The DataModule the attack needs (it holds the growing set and buys for it)."""
        raise NotImplementedError

    def buy_round(self, round_: int, datamodule: Any) -> None:  # pragma: no cover - interface
        """Buy round ``round_`` through ``datamodule``, with the clone as it is now."""
        raise NotImplementedError

    def sizes(self, datamodule: Any) -> dict[str, int]:  # pragma: no cover - interface
        """The training set's size after the round just trained on (for ``history``)."""
        raise NotImplementedError
