"""The LightningCLI entry: every experiment is ``python main.py {fit,validate,test,predict} --config ...``."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from edm_lightning.errors import exit_if_user_error
from edm_lightning.routing import refuse_keys_on_command_line
from edm_lightning.tracking import LogConfigCallback, fill_wandb_defaults, finish_wandb_run, resolve_wandb_mode

__all__ = ["EDMLightningCLI", "main"]


class EDMLightningCLI(LightningCLI):
    """LightningCLI with the data -> model links every config relies on.

    The DataModule is the single source of the class count, input shape and normalisation; the
    model receives them by ``link_arguments``, so no config types them twice.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._command_line = sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, list) else []
        super().parse_arguments(parser, args)

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        refuse_keys_on_command_line(config, self._command_line)
        resolve_wandb_mode()  # before any WandbLogger exists: offline when there are no credentials
        fill_wandb_defaults(config)


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
        return EDMLightningCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_callback=LogConfigCallback,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )
    except Exception as err:
        exit_if_user_error(err)
        raise
    finally:
        finish_wandb_run()

