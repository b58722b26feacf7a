"""``edm-lightning``: the LightningCLI jobs, the experiment runner, the data tool, the exporter and the prediction API
behind one command.

    edm-lightning fit --config edm.yaml                      # fit | validate | test | predict (LightningCLI)
    edm-lightning experiment --config experiment/fashionmnist.yaml
    edm-lightning data fetch fashionmnist --root data
    edm-lightning export --victim.checkpoint ... --format onnx --out model.onnx
    edm-lightning serve --config serve.yaml                  # the prediction API (add-client first)

A shipped config is named by its path under ``configs/`` (``edm.yaml``, ``attack/knockoff.yaml``), from any
folder; in a clone, ``python main.py ...`` and ``configs/...`` paths work as before.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

from edm_lightning import cli
from edm_lightning.data.__main__ import main as data_main
from edm_lightning.experiment.__main__ import main as experiment_main
from edm_lightning.export.__main__ import main as export_main
from edm_lightning.serve.__main__ import main as serve_main

__all__ = ["COMMANDS", "main"]

#: Every subcommand with what it does, as ``edm-lightning --help`` lists them.
COMMANDS = {
    "fit": "train a model from a config: the EDM ensemble, the undefended target, a hash network, an attack's clone",
    "validate": "run a config's model over the validation set",
    "test": "test a config's model (or a checkpoint: --ckpt_path) on the test set",
    "predict": "write a config's model's predictions",
    "experiment": "the main job: train the victims and run every attack of an experiment config, with its tables",
    "data": "fetch datasets for offline use and list the known ones",
    "export": "export a trained victim (ONNX or torch.export) with a manifest and its digest",
    "serve": "the prediction API behind keys and query budgets (serve add-client: add a client)",
}
_TOOLS = {"experiment": experiment_main, "data": data_main, "export": export_main, "serve": serve_main}


def main() -> None:
    """Dispatch on the first argument: a tool (``experiment``, ``data``, ``export``, ``serve``) or a LightningCLI
    subcommand; with no argument or ``--help``, list them all.

    Raises:
        SystemExit: with the tool's exit status (2 with no command or an unknown one).
    """
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in _TOOLS:
        result = _TOOLS[command](sys.argv[2:], prog=f"edm-lightning {command}")
        if command == "data":
            raise SystemExit(result)
    elif command == "--version":
        print(f"edm-lightning {version('edm-lightning')}")
    elif command in (None, "-h", "--help"):
        print(overview(), file=sys.stdout if command else sys.stderr)
        raise SystemExit(0 if command else 2)
    elif command not in COMMANDS and not command.startswith("-"):
        print(f"{overview()}\nerror: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}.",
              file=sys.stderr)
        raise SystemExit(2)
    else:
        sys.argv[0] = "edm-lightning"
        cli.main()


def overview() -> str:
    """The command's help: its usage line and one line per subcommand."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(["usage: edm-lightning COMMAND [--config FILE ...] [--KEY VALUE ...] | --version", "", "commands:", *lines,
                      "", "Run 'edm-lightning COMMAND --help' for a command's options."])


if __name__ == "__main__":
    main()
