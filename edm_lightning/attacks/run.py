"""The one way to run an attack: fit the attacker, test its clone, return the figures the field reports."""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

import lightning as L

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.errors import ConfigError

__all__ = ["ReportsFigures", "require_single_process", "run_attack"]


@runtime_checkable
class ReportsFigures(Protocol):
    """An attack's DataModule or LightningModule with figures of its own for the results (sizes, steps)."""

    def figures(self) -> dict[str, Any]:
        """Name -> JSON-able value, merged into the attack's result."""
        ...


def run_attack(
    datamodule: AttackDataModule,
    module: L.LightningModule,
    max_epochs: int,
    default_root_dir: str | None = None,
    logger: Any = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Fit the attacker, test the clone, and return the figures the field reports.

    The one implementation behind the CLI configs and the Python entry points (``run_knockoff`` ...):
    both build the same DataModule and LightningModule and let a Trainer run them. ``trainer_kwargs``
    (``accelerator``, ``devices``, ``precision``...) go to the Trainer.

    Returns:
        ``clone_acc`` and ``agreement`` on the victim's test set (fractions), ``queries`` (all runs),
        ``queries_this_run``, ``budget``, ``wall_time_s`` (fit only), and the parts' own :class:`ReportsFigures`.
    """
    trainer_kwargs.setdefault("devices", 1)
    trainer = L.Trainer(
        max_epochs=max_epochs, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=default_root_dir,
        num_sanity_val_steps=0, **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_time = time.perf_counter() - start
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    results = {
        "clone_acc": float(metrics["test/acc"]),
        "agreement": float(metrics["test/agreement"]),
        "queries": int(datamodule.oracle.queries_spent),
        "queries_this_run": int(datamodule.oracle.queries_spent - datamodule.oracle.resumed_from),
        "budget": int(datamodule.oracle.budget),
        "wall_time_s": round(fit_time, 2),
    }
    for part in (datamodule, module):
        if isinstance(part, ReportsFigures):
            results.update(part.figures())
    return results


def require_single_process(trainer: L.Trainer, attack: str) -> None:
    """Refuse DDP for attacks that query inside their training loop: every process would spend the budget.

    Raises:
        ConfigError: ``trainer.world_size > 1``.
    """
    if trainer.world_size > 1:
        raise ConfigError(
            f"{attack} queries the victim inside its training loop: under DDP each of the {trainer.world_size} "
            f"processes would query on its own and spend the budget {trainer.world_size} times. Run it on one device "
            "(trainer.devices: 1). KnockoffNets buys its queries once, in prepare_data, and can use DDP."
        )
