"""``edm-lightning``: the LightningCLI jobs, the experiment runner and the data tool behind one command.

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

from edm_lightning import cli
from edm_lightning.data.__main__ import main as data_main
from edm_lightning.experiment.__main__ import main as experiment_main
from edm_lightning.export.__main__ import main as export_main
from edm_lightning.serve.__main__ import main as serve_main

__all__ = ["main"]


def main() -> None:
    """Dispatch on the first argument: ``experiment``, ``data``, ``export``, ``serve``, or a LightningCLI
    subcommand.

    Raises:
        SystemExit: with the tool's exit status.
    """
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "experiment":
        sys.argv = [f"{sys.argv[0]} experiment", *sys.argv[2:]]
        experiment_main()
    elif command == "export":
        sys.argv = [f"{sys.argv[0]} export", *sys.argv[2:]]
        export_main()
    elif command == "serve":
        sys.argv = [f"{sys.argv[0]} serve", *sys.argv[2:]]
        serve_main()
    elif command == "data":
        sys.argv = [f"{sys.argv[0]} data", *sys.argv[2:]]
        raise SystemExit(data_main())
    else:
        cli.main()


if __name__ == "__main__":
    main()
