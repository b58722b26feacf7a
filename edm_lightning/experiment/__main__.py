"""``python -m edm_lightning.experiment --config configs/experiment/fashionmnist.yaml [--seeds [0,1,2]] ...``"""

from __future__ import annotations

import sys

from edm_lightning.command_line import parse_command_line, refuse_keys_on_command_line
from edm_lightning.errors import exit_if_user_error
from edm_lightning.experiment.config import ExperimentConfig
from edm_lightning.experiment.execution import StageFailed
from edm_lightning.experiment.runner import run_experiment


def main(argv: list[str] | None = None, prog: str = "python -m edm_lightning.experiment") -> list[dict]:
    """Parse an experiment config (YAML plus overrides), run it, and return its attack records; ``prog`` is the
    name its help and errors give it."""
    config, argv = parse_command_line(ExperimentConfig, argv, prog)
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
