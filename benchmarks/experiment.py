"""Wall time and peak memory of an experiment run from scratch (the README's main job by default).

    python benchmarks/experiment.py                                            # configs/experiment/fashionmnist.yaml
    python benchmarks/experiment.py --config configs/experiment/fashionmnist.yaml --runs_dir /tmp/bench

The run goes to a fresh ``runs_dir`` (default: a temporary folder) so no cached stage is reused; W&B is
off. Peak memory is the largest resident set of the process running the experiment.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsonargparse import CLI

ROOT = Path(__file__).resolve().parents[1]


def main(config: str = "configs/experiment/fashionmnist.yaml", runs_dir: str | None = None) -> None:
    """Run the experiment in a child process and print its wall time and peak resident memory.

    Args:
        config: experiment YAML.
        runs_dir: where its stages go (``None``: a temporary folder, removed afterwards).
    """
    with tempfile.TemporaryDirectory() as tmp:
        runs = runs_dir or tmp
        cmd = [sys.executable, "-m", "edm_lightning.experiment", "--config", config, "--runs_dir", f"{runs}/runs",
               "--results_dir", f"{runs}/results", "--wandb_project", "null"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    print(f"{config}: wall time {wall / 60:.1f} min, peak memory {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    CLI(main)
