"""The LightningCLI entry: every experiment is ``python main.py {fit,validate,test,predict} --config ...``."""

from __future__ import annotations

import importlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

import edm_lightning.models  # noqa: F401  (imported, their classes resolve by short name: --model EnsembleModule)
from edm_lightning.attacks import DFMEModule
from edm_lightning.checkpoints import (
    check_structure,
    checkpoint_class,
    configured_checkpoints,
    is_ensemble,
    read_checkpoint,
    trained_on,
)
from edm_lightning.command_line import CONCISE_USAGE, prepare_command_line, refuse_keys_on_command_line, refuse_nan
from edm_lightning.data import get_spec
from edm_lightning.data.datamodules import LINKED_ARGUMENTS
from edm_lightning.errors import CheckpointNotFoundError, ConfigError, exit_if_user_error
from edm_lightning.files import write_atomic
from edm_lightning.models.summary import JobSummary
from edm_lightning.tracking import LogConfigCallback, fill_wandb_defaults, finish_wandb_run, resolve_wandb_mode

__all__ = ["EDMLightningCLI", "JobRun", "Trainer", "check_checkpoint_fits", "check_optimizer_override", "main",
           "resolve_checkpoint_name", "run_job"]


class Trainer(L.Trainer):
    """Lightning's Trainer, with a whole number of batches parsed as a count.

    Lightning annotates ``limit_*_batches``, ``overfit_batches`` and ``val_check_interval`` as ``float | int``,
    so the CLI parsed ``--trainer.limit_train_batches=1`` as ``1.0``, i.e. the whole epoch; here ``1`` is
    one batch and ``0.25`` a quarter, as Lightning documents.
    """

    def __init__(
        self,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        overfit_batches: int | float = 0.0,
        val_check_interval: int | float | None = None,
        **kwargs: Any,
    ):
        super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
                         overfit_batches=overfit_batches, val_check_interval=val_check_interval, **kwargs)


class EDMLightningCLI(LightningCLI):
    """LightningCLI with the data -> model links every config relies on.

    The DataModule is the single source of the class count, input shape and normalisation; the
    model receives them by ``link_arguments``, so no config types them twice. A model's optimiser is its
    ``optim`` (what the committed configs and sweeps set); LightningCLI's ``--optimizer`` and ``--lr_scheduler``
    (any ``torch.optim`` class) replace it for one run.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in LINKED_ARGUMENTS:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._command_line = sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, list) else []
        super().parse_arguments(parser, args)

    @override
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the configured model and data instead of letting it rewrite them.

        Lightning's own version reads the checkpoint's hyper-parameters into the config, so a checkpoint of
        another class or shape silently replaces the configured model. Here the file is read safely and a
        checkpoint that does not fit the configured model (class, architecture, members, dataset) is refused.

        Raises:
            ConfigError: an empty ``--ckpt_path``, or a checkpoint that does not fit (its message says why).
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "":
            raise ConfigError("--ckpt_path is empty: give a checkpoint file, or best, last or hpc")
        if ckpt_path in ("best", "last", "hpc"):
            ckpt_path = self.config[subcommand].ckpt_path = resolve_checkpoint_name(ckpt_path, subcommand,
                                                                                    self.config[subcommand])
        if not ckpt_path or ckpt_path == "registry":  # Lightning's name for a model registry only it can reach
            return
        state = read_checkpoint(ckpt_path, "--ckpt_path")  # a missing one is named with the config that writes it
        check_checkpoint_fits(state, str(ckpt_path), self.config[subcommand])

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer, ending every job with :class:`~edm_lightning.models.summary.JobSummary`'s line
        (what it produced and where), whatever callbacks the config lists.

        Returns:
            The Trainer.
        """
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(callback, JobSummary) for callback in trainer.callbacks):
            trainer.callbacks.append(JobSummary())
        return trainer

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        refuse_keys_on_command_line(config, self._command_line)
        refuse_nan(config)
        check_optimizer_override(config)
        if fill_wandb_defaults(config):
            resolve_wandb_mode()  # before the WandbLogger exists: offline when there are no credentials


def main(args: list[str] | None = None, run: bool = True) -> EDMLightningCLI:
    """Run the CLI; tests pass ``args`` as a list instead of reading ``sys.argv``.

    Errors that are the user's to fix (missing data, values out of range) end the run with their
    message and exit status 2, like jsonargparse's own configuration errors, not with a traceback.

    Returns:
        The CLI object (its ``model``, ``datamodule``, ``trainer``), e.g. for tests.

    Raises:
        SystemExit: status 2 for a user error, with its message.
    """
    try:
        if args is None:  # from the command line: LightningCLI reads sys.argv (and warns if also given args)
            sys.argv[1:] = prepare_command_line(sys.argv[1:])
        else:
            args = prepare_command_line([str(a) for a in args])
        return EDMLightningCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_callback=LogConfigCallback,
            trainer_class=Trainer,
            args=args,
            run=run,
            auto_configure_optimizers=True,
            parser_kwargs={"allow_abbrev": False,  # exact option names only: --trainer.max_epoch is not --trainer.max_epochs
                           **{subcommand: {"usage": CONCISE_USAGE, "allow_abbrev": False}
                              for subcommand in LightningCLI.subcommands()}},
        )
    except Exception as err:
        exit_if_user_error(err)
        raise
    finally:
        finish_wandb_run()
        # Lightning leaves the DDP process group alive; a gloo group still alive at interpreter exit can abort the
        # process ("terminate called without an active exception") after a run that succeeded.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class JobRun:
    """A finished job: its test metrics and the parts it built (for figures of their own)."""

    metrics: dict[str, float]  # one dict over all test loaders; keys already say which loader they are from
    datamodule: L.LightningDataModule
    model: L.LightningModule
    fit_seconds: float


def run_job(config: dict[str, Any], folder: Path, *, fit: bool = True, resume: str | None = None,
            test_checkpoint: str | None = "best", header: str = "") -> JobRun:
    """Run a LightningCLI job the way ``python main.py fit --config <folder>/config.yaml`` then
    ``python main.py test ... --ckpt_path`` would, in this process and with one Trainer (so one logger run).

    ``<folder>/config.yaml`` is ``header`` (comment lines) and the CLI's complete dump of the job (every default
    filled in, secrets masked): ``main.py`` run on it builds the same job.

    Args:
        config: the job (``seed_everything``, ``trainer``, ``model``, ``data``; ``class_path``/``init_args``).
        folder: where ``config.yaml`` goes (the trainer's ``default_root_dir``, so also its dump).
        fit: fit before testing (``False``: ``main.py test`` alone, for a model with nothing to train).
        resume: a checkpoint to resume the fit from (``--ckpt_path``), or ``None``.
        test_checkpoint: what to test: ``"best"`` (the checkpoint callback's best), a path, or ``None`` (the
            weights the fit ended with).
        header: comment lines (each starting with ``#``) kept at the top of ``config.yaml``.

    Returns:
        The test metrics, the DataModule and model, and the fit's wall time.

    Raises:
        ConfigError: the CLI refused the config (its message is printed first).
    """
    path = folder / "config.yaml"
    write_atomic(path, header + yaml.safe_dump(config, sort_keys=False))
    argv, sys.argv = sys.argv, sys.argv[:1]  # the caller's own command line is not this job's (LightningCLI warns)
    try:
        cli = main(["--config", str(path)], run=False)
    except SystemExit as refused:  # main() printed why; a caller running many jobs goes on with the others
        raise ConfigError(f"the job {str(path)!r} was refused (exit status {refused.code}); the reason is printed above "
                          "it in this log") from None
    finally:
        sys.argv = argv
    try:
        start = time.perf_counter()
        if fit:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
        fit_seconds = time.perf_counter() - start
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=test_checkpoint, verbose=False)
    finally:
        finish_wandb_run()
        # the complete dump (a fit saved it without the header), also when the run failed
        write_atomic(path, header + cli.parser.dump(cli.config, skip_unset=False))
    metrics: dict[str, float] = {}
    for loader_metrics in tested:
        metrics.update({key.split("/dataloader_idx")[0]: float(value) for key, value in loader_metrics.items()})
    return JobRun(metrics, cli.datamodule, cli.model, fit_seconds)


def check_optimizer_override(config: Any) -> None:
    """Refuse ``--lr_scheduler`` without ``--optimizer``, and both for a model that steps its own optimisers.

    LightningCLI would silently drop a scheduler given alone, and would replace the two optimisers of a
    manually optimised model (DFME's generator and clone) by one.

    Raises:
        ConfigError: what was given, and what to set instead.
    """
    if config.get("lr_scheduler") and not config.get("optimizer"):
        raise ConfigError("--lr_scheduler was given without --optimizer; LightningCLI applies a scheduler only with the "
                          "optimizer it replaces, e.g. --optimizer torch.optim.SGD --optimizer.lr 0.01 --lr_scheduler ...")
    model_class = str(getattr(config.get("model"), "class_path", "") or "")
    module, _, name = model_class.rpartition(".")
    if config.get("optimizer") and module and issubclass(getattr(importlib.import_module(module), name), DFMEModule):
        raise ConfigError(f"{model_class} steps its own optimisers (generator and clone); --optimizer/--lr_scheduler "
                          "cannot replace them: set its learning rates in model.init_args instead (see --model.help).")


def resolve_checkpoint_name(name: str, subcommand: str, config: Any) -> str | None:
    """The file ``--ckpt_path best``, ``last`` or ``hpc`` names: the configured ``ModelCheckpoint``'s
    ``<dirpath>/<filename>.ckpt`` or ``<dirpath>/last.ckpt``, or the newest ``hpc_ckpt_<N>.ckpt`` in the trainer's
    ``default_root_dir``.

    Lightning resolves these names from what the checkpoint callback saved in the same process, so in a new
    ``main.py test`` process ``last`` found nothing and the untrained model was tested with a mere warning. A
    ``fit`` given ``last`` before any checkpoint exists starts from scratch (Lightning's set-and-forget use).

    Args:
        name: ``"best"``, ``"last"`` or ``"hpc"``.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        config: that subcommand's parsed config (``trainer.callbacks``).

    Returns:
        The checkpoint's path, or ``None`` for a ``fit`` with no last checkpoint yet.

    Raises:
        CheckpointNotFoundError: no configured ``ModelCheckpoint`` names such a file, or the file does not exist.
    """
    if name == "hpc":  # what SLURM's pre-emption saved: Lightning's hpc_ckpt_<N>.ckpt with the highest N
        folder = Path((config.get("trainer") or {}).get("default_root_dir") or ".")
        saved = {int(match[1]): path for path in folder.glob("hpc_ckpt_*.ckpt")
                 if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name))}
        if saved:
            return str(saved[max(saved)])
        raise CheckpointNotFoundError(f"--ckpt_path hpc: there is no hpc_ckpt_<N>.ckpt in {str(folder)!r} (Lightning "
                                      "saves one there when SLURM pre-empts a fit); give --ckpt_path a checkpoint file.")
    files = configured_checkpoints((config.get("trainer") or {}).get("callbacks"))[name]
    found = [path for path in files if path.is_file()]
    if found:
        return str(found[0])
    if subcommand == "fit" and name == "last":
        rank_zero_warn(f"--ckpt_path last: no {' or '.join(map(str, files)) or 'last checkpoint'} yet; fitting from "
                       "scratch.")
        return None
    where = (f"there is no {' or '.join(map(str, files))}" if files else
             f"no ModelCheckpoint callback of the config names a fixed {name} checkpoint file (dirpath"
             f"{', filename and monitor' if name == 'best' else ' and save_last'})")
    raise CheckpointNotFoundError(f"--ckpt_path {name}: {where}. Train it first (python main.py fit with the same "
                                  "config), or give --ckpt_path the checkpoint's file.")


def check_checkpoint_fits(state: dict, path: str, config: Any) -> None:
    """Refuse a checkpoint that is not of the configured model's class, architecture, members or dataset.

    Args:
        state: the checkpoint, read safely (:func:`~edm_lightning.checkpoints.read_checkpoint`).
        path: the file, for messages.
        config: one subcommand's parsed config (``model``, ``data``).

    Raises:
        ConfigError: the checkpoint belongs to another model or dataset; the message says which config fits it.
    """
    configured = str(config.model.class_path).rpartition(".")[2] if getattr(config.model, "class_path", None) else None
    saved = checkpoint_class(state) or ("EnsembleModule" if is_ensemble(state) else None)
    if configured and saved and saved != configured:
        raise ConfigError(f"--ckpt_path {path!r} holds a checkpoint of {saved}, but the config builds {configured}: "
                          "use the config that trained it (its config.yaml sits beside the checkpoints)")
    if configured and saved is None and is_ensemble(state) != (configured == "EnsembleModule"):
        kind = "an EDM ensemble" if is_ensemble(state) else "a single classifier"
        raise ConfigError(f"--ckpt_path {path!r} holds {kind}, but the config builds {configured}")
    hp, init_args = state["hyper_parameters"], getattr(config.model, "init_args", None) or {}
    configured_values = {key: init_args.get(key) for key in ("arch", "num_members")}
    compared = tuple(key for key, value in configured_values.items() if key in hp and value is not None)
    check_structure(hp, configured_values, compared, f"model ({path!r})")
    data = getattr(config.data, "init_args", None) or {}
    dataset = data.get("dataset") if hasattr(data, "get") else None
    if dataset is None:
        return
    trained = trained_on(state)
    if trained is not None and trained != dataset:
        raise ConfigError(f"--ckpt_path {path!r} was trained on {trained!r}, but the config's data is {dataset!r}: "
                          "evaluate it on its own dataset, or name the checkpoint trained on this one")
    spec = get_spec(dataset)
    check_structure(hp, {"num_classes": spec.num_classes, "input_shape": spec.input_shape},
                    tuple(key for key in ("num_classes", "input_shape") if key in hp), f"data {dataset!r} ({path!r})")
