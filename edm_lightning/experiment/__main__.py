"""``python -m edm_lightning.experiment --config configs/experiment/fashionmnist.yaml [--seeds [0,1,2]] ...``"""

from __future__ import annotations

import sys

from jsonargparse import auto_cli

from edm_lightning.command_line import CONCISE_USAGE, prepare_command_line, refuse_keys_on_command_line
from edm_lightning.errors import exit_if_user_error
from edm_lightning.experiment.config import ExperimentConfig
from edm_lightning.experiment.execution import StageFailed
from edm_lightning.experiment.runner import run_experiment


def main(argv: list[str] | None = None, prog: str = "python -m edm_lightning.experiment") -> list[dict]:
    """Parse an experiment config (YAML plus overrides), run it, and return its attack records; ``prog`` is the
    name its help and errors give it."""
    try:
        argv = prepare_command_line(sys.argv[1:] if argv is None else list(argv))
    except Exception as err:
        exit_if_user_error(err)
        raise
    config = auto_cli(ExperimentConfig, args=argv, prog=prog,
                      usage=CONCISE_USAGE, allow_abbrev=False)
    try:
        refuse_keys_on_command_line(config, argv)
        return run_experiment(config)
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume.", file=sys.stderr)
        raise SystemExit(130) from None
    except StageFailed as err:  # each failed stage's traceback is in its stage.log
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        exit_if_user_error(err)
        raise


if __name__ == "__main__":
    main()
