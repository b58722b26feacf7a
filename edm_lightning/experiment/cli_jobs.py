"""A stage as a LightningCLI job: its Trainer section, its W&B run, the header of its ``config.yaml``, the router
key where the job reads it, and running it through the CLI (:func:`~edm_lightning.cli.run_job`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from edm_lightning.cli import JobRun, run_job
from edm_lightning.command_line import class_config
from edm_lightning.experiment.config import ExperimentConfig
from edm_lightning.routing import ROUTER_KEY_ENV, ROUTER_KEY_FILE_ENV, as_secret, router_class

__all__ = ["logger_config", "router_key_in_environment", "run_stage_job", "stage_header", "trainer_config"]


def run_stage_job(config: ExperimentConfig, folder: Path, job: dict, tested: str | None, **options: Any) -> JobRun:
    """``job`` through the CLI (:func:`~edm_lightning.cli.run_job`), with the router key where it reads it and the
    header that says how to run the stage alone (``tested``: the checkpoint its test reads, ``None``: test-only).

    Returns:
        The finished job.
    """
    with router_key_in_environment(config):
        return run_job(job, folder, header=stage_header(config, folder, tested), **options)


def trainer_config(config: ExperimentConfig, folder: Path, seed: int | None, job_type: str, epochs: int,
                   callbacks: list[dict]) -> dict:
    """The Trainer of every stage: its epochs, the experiment's device and precision, its W&B run, its folder.

    Returns:
        The ``trainer`` section of the stage's config.
    """
    return {"max_epochs": epochs, **config.trainer.options(), "logger": logger_config(config, job_type, folder, seed),
            "default_root_dir": str(folder), "callbacks": callbacks, "enable_model_summary": False}


def stage_header(config: ExperimentConfig, folder: Path, tested: str | None) -> str:
    """The comment on top of a stage's ``config.yaml``: how to run that stage alone.

    Args:
        config: the experiment.
        folder: the stage's folder.
        tested: the checkpoint its test reads; ``None`` for a test-only job.

    Returns:
        Comment lines, each ending in a newline.
    """
    keyed = any(router_class(router).keyed for router in config.edm.routers)
    key = (f"# Set ${ROUTER_KEY_ENV} (or ${ROUTER_KEY_FILE_ENV}) to the experiment's router key first: it is never written "
           "here; a stage behind a keyed router records the key's fingerprint and refuses another key.\n"
           if keyed else "")
    path = folder / "config.yaml"
    elsewhere = "--trainer.default_root_dir DIR --trainer.callbacks.dirpath DIR" + (
        " --trainer.logger.save_dir DIR" if config.wandb_project else "")  # W&B's save_dir is where config.yaml goes
    if tested is None:
        return f"# One stage of the experiment {config.name!r}, as the runner ran it. This stage alone:\n" \
               f"#   python main.py test --config {path}\n{key}"
    return (f"# One stage of the experiment {config.name!r}, as the runner ran it. This stage alone:\n"
            f"#   python main.py fit --config {path}\n"
            f"#   python main.py test --config {path} --ckpt_path {folder / tested}\n"
            f"# fit writes into {folder}, replacing the checkpoints later stages read; to write into DIR instead add\n"
            f"#   {elsewhere}   (then test DIR/{tested})\n{key}")


@contextlib.contextmanager
def router_key_in_environment(config: ExperimentConfig) -> Iterator[None]:
    """The experiment's router key where a job reads it (``$EDM_ROUTER_KEY``) while the job runs: never in its config."""
    if config.edm.router_key is None:
        yield
        return
    before = os.environ.get(ROUTER_KEY_ENV)
    os.environ[ROUTER_KEY_ENV] = as_secret(config.edm.router_key).get_secret_value()  # also a plain str set after init
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ROUTER_KEY_ENV, None)
        else:
            os.environ[ROUTER_KEY_ENV] = before


def logger_config(config: ExperimentConfig, job_type: str, folder: Path, seed: int | None) -> dict | bool:
    """One W&B run per stage: the experiment as its group, the stage kind as its job type.

    Returns:
        The ``trainer.logger`` section (``False``: the experiment logs to no W&B project).
    """
    if not config.wandb_project:
        return False
    name = f"{config.name}-{job_type}" + (f"-seed{seed}" if seed is not None else "")
    return class_config(WandbLogger, {"project": config.wandb_project, "group": config.name, "job_type": job_type,
                                      "save_dir": str(folder), "name": name, "tags": [config.dataset, job_type]})
