"""The LightningCLI entry: every experiment is ``python main.py {fit,validate,test,predict} --config ...``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["EDMLightningCLI", "main"]


class EDMLightningCLI(LightningCLI):
    """LightningCLI with the data -> model links every config relies on.

    The DataModule is the single source of the class count, input shape and normalisation; the
    model receives them by ``link_arguments``, so no config types them twice.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> EDMLightningCLI:
    """Run the CLI; tests pass ``args`` as a list instead of reading ``sys.argv``."""
    return EDMLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
