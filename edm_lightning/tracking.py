"""Weights & Biases around LightningCLI: offline fallback, the resolved config, one run per job.

W&B is composed into any job with ``--config configs/logger/wandb.yaml``. Four behaviours Lightning does not give:
- without credentials (CI, air-gapped clusters) ``wandb.init`` fails; we log offline and say so once;
- ``WandbLogger`` never calls ``wandb.finish()``, so a second job in one process would reuse the first
  run; :func:`finish_wandb_run` ends it;
- the full resolved configuration (trainer, data, model) is logged with the run, not only the model's
  hyper-parameters (:class:`LogConfigCallback`);
- one logger block serves every job: what depends on the job is filled in (:func:`fill_wandb_defaults`).
"""

from __future__ import annotations

import importlib
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

__all__ = ["LogConfigCallback", "fill_wandb_defaults", "finish_wandb_run", "is_wandb_logger", "resolve_wandb_mode",
           "wandb_has_credentials"]


_told_offline = False


def wandb_has_credentials() -> bool:
    """Whether ``wandb.init`` could authenticate: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode() -> str:
    """The W&B mode this process will use; without credentials and without ``WANDB_MODE``, ``offline``.

    Committed configs never set ``mode`` (it would beat ``WANDB_MODE``); the environment decides.

    Returns:
        ``online``, ``offline``, ``disabled`` or whatever ``WANDB_MODE`` says.
    """
    global _told_offline
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_has_credentials():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    if not _told_offline and _launch_rank() == 0:
        print(
            "W&B: no credentials found (wandb login / WANDB_API_KEY), logging offline; "
            "upload later with `wandb sync <save_dir>/wandb/offline-run-*`, or set WANDB_MODE=disabled.",
            file=sys.stderr,
        )
        _told_offline = True
    return "offline"


def _launch_rank() -> int:
    """This process's global rank as launchers set it (torchrun, SLURM), before any Trainer exists."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def fill_wandb_defaults(config: Any) -> bool:
    """Give a ``WandbLogger`` composed from ``configs/logger/wandb.yaml`` what depends on the job, in place.

    Unset ``init_args`` become: ``save_dir`` the trainer's ``default_root_dir``; ``job_type`` the name of
    the job's first config file (``edm`` for ``configs/edm.yaml``); ``group`` the data's ``dataset``;
    ``tags`` the dataset and the model's ``arch``. A value set in a config or on the command line wins.

    Args:
        config: one subcommand's parsed LightningCLI namespace (``trainer``, ``model``, ``data``, ``config``).

    Returns:
        Whether the job logs to W&B at all.
    """
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    data = getattr(config.data, "init_args", None) or {}
    model = getattr(config.model, "init_args", None) or {}
    dataset, arch = _get(data, "dataset"), _get(model, "arch")
    job_configs = [Path(str(path)) for path in (config.get("config") or [])]
    job_configs = [path for path in job_configs if path.parent.name not in ("logger", "trainer")]
    derived = {
        "save_dir": config.trainer.default_root_dir,
        "job_type": job_configs[0].stem if job_configs else None,
        "group": dataset,
        "tags": [str(tag) for tag in (dataset, arch) if tag is not None] or None,
    }
    found = False
    for logger in loggers:
        if not is_wandb_logger(getattr(logger, "class_path", None)):
            continue
        found = True
        for key, value in derived.items():
            unset = (None, ".") if key == "save_dir" else (None,)  # "." is WandbLogger's own default
            if value is not None and _get(logger.init_args, key) in unset:
                logger.init_args[key] = value
    return found


def is_wandb_logger(class_path: Any) -> bool:
    """Whether a config's logger ``class_path`` names Lightning's ``WandbLogger``, by any of its import paths
    (``lightning.pytorch.loggers.WandbLogger``, or ``lightning.pytorch.loggers.wandb.WandbLogger`` as dumps write it).

    Returns:
        ``True`` for the W&B logger or a subclass of it.
    """
    if not isinstance(class_path, str) or not class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger) if cls is not None else name == "WandbLogger"


def _get(namespace: Any, key: str) -> Any:
    return namespace.get(key) if hasattr(namespace, "get") else getattr(namespace, key, None)


def finish_wandb_run() -> None:
    """End the current W&B run, if any, so the next job in this process starts a new one."""
    if "wandb" in sys.modules:
        import wandb  # already imported by whoever started a run; importing it here otherwise costs seconds

        if wandb.run is not None:
            wandb.finish()


class LogConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` when fitting (overwriting: sweeps and requeued jobs reuse folders) and log the config to
    every logger. ``validate``/``test``/``predict`` only log it: the file beside the checkpoints stays the config
    that trained them (a test's dump would add its ``ckpt_path``, and a later ``fit`` of it would resume from there).
    """

    def __init__(self, *args, **kwargs):
        kwargs["overwrite"] = True
        super().__init__(*args, **kwargs)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)
        elif not self.already_saved and trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The parser's own dump, as config.yaml holds it: secrets (router keys) are masked, never logged.
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})
