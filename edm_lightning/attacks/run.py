"""The one way to run an attack: fit the attacker, test its clone, return the figures the field reports.

An attack is an :class:`AttackJob`: its DataModule and LightningModule classes with their arguments. The
same value runs from Python (:meth:`AttackJob.run`, behind ``run_knockoff`` ...) and is written as a
LightningCLI config (:meth:`AttackJob.cli_config`, what the experiment runner runs through ``main.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import lightning as L

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.command_line import class_config
from edm_lightning.data.datamodules import LINKED_ARGUMENTS
from edm_lightning.errors import ConfigError

__all__ = ["AttackJob", "ReportsFigures", "attack_figures", "require_single_process", "run_attack"]



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

    What the Python entry points (``run_knockoff`` ...) run: the DataModule and LightningModule of the same
    :class:`AttackJob` that ``main.py`` and the experiment runner build from its config. ``trainer_kwargs``
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
    return attack_figures(datamodule, module, metrics, fit_time)


def attack_figures(datamodule: AttackDataModule, module: L.LightningModule, metrics: dict[str, float],
                   fit_time: float) -> dict[str, Any]:
    """The figures of a finished attack: the clone's test ``metrics``, the oracle's counts, the parts' own figures.

    Returns:
        ``clone_acc``, ``agreement``, ``queries``, ``queries_this_run``, ``budget``, ``wall_time_s`` and each
        part's :class:`ReportsFigures`.
    """
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
    results.update(datamodule.detector_figures())
    return results


@dataclass
class AttackJob:
    """One attack as a LightningCLI job: what ``python main.py fit --config configs/attack/<attack>.yaml`` builds.

    Args:
        module: the attacker's LightningModule class (the clone and what else it learns).
        module_args: its init arguments, without those the DataModule supplies (class count, input shape,
            normalisation: linked as LightningCLI links them).
        datamodule: the attack's DataModule class (the victim behind its oracle, the attacker's data).
        data_args: its init arguments (``victim`` first).
        max_epochs: the Trainer's epochs.
        seed: ``seed_everything`` before the parts are built (their initial weights follow it).
    """

    module: type[L.LightningModule]
    module_args: dict[str, Any]
    datamodule: type[AttackDataModule]
    data_args: dict[str, Any]
    max_epochs: int
    seed: int

    def build(self) -> tuple[AttackDataModule, L.LightningModule]:
        """The seeded DataModule and LightningModule, in LightningCLI's order (data first, then the model)."""
        L.seed_everything(self.seed, workers=True, verbose=False)  # as LightningCLI seeds
        datamodule = self.datamodule(**self.data_args)
        linked = {key: getattr(datamodule, key) for key in LINKED_ARGUMENTS}
        return datamodule, self.module(**self.module_args, **linked)

    def run(self, trainer: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fit and test in this process (:func:`run_attack`); ``trainer`` holds Trainer arguments.

        Returns:
            The attack's figures (:func:`attack_figures`).
        """
        datamodule, module = self.build()
        return run_attack(datamodule, module, self.max_epochs, **(trainer or {}))

    def cli_config(self) -> dict[str, Any]:
        """The job as a LightningCLI config (``seed_everything``, ``trainer.max_epochs``, ``model``, ``data``).

        Secrets are left out (the router key, an API key): the job reads them from the environment where it
        runs (``$EDM_ROUTER_KEY``, ``$EDM_API_KEY``), so the config can be written, logged and shared.

        Returns:
            The config as plain data (``yaml.safe_dump`` writes it).
        """
        return {"seed_everything": self.seed, "trainer": {"max_epochs": self.max_epochs},
                "model": class_config(self.module, self.module_args), "data": class_config(self.datamodule, self.data_args)}


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
