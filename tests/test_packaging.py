"""The package works when installed from its wheel, outside the clone: the edm-lightning command and its configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.files import REPO_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel built from this tree and installed (without dependencies: they are this environment's) in a folder."""
    root = tmp_path_factory.mktemp("installed")
    wheels, target = root / "wheels", root / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "-q", "-w", str(wheels)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("edm_lightning-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "disabled"}
    return target, env


def run(installed, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    target, env = installed
    return subprocess.run([str(target / "bin" / "edm-lightning"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.integration
def test_the_installed_command_runs_a_job_from_a_shipped_config(installed, tmp_path, real_data_root):
    where = subprocess.run([sys.executable, "-c", "import edm_lightning; print(edm_lightning.__file__)"], cwd=tmp_path,
                           env=installed[1], capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed[0])), where  # the wheel's package, not the clone's
    printed = run(installed, ["fit", "--config", "edm.yaml", "--print_config"], tmp_path)
    assert printed.returncode == 0 and "class_path: edm_lightning.models.EnsembleModule" in printed.stdout
    helped = run(installed, ["fit", "--model.help", "EnsembleModule"], tmp_path)  # short class names resolve
    assert helped.returncode == 0 and "--model.diversity_weight" in helped.stdout
    fitted = run(installed, ["fit", "--config", "baseline.yaml", f"--data.init_args.root={real_data_root}",
                             "--data.init_args.val_size=200", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"], tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert (tmp_path / "runs/baseline/checkpoints/best.ckpt").is_file()
    unknown = run(installed, ["fit", "--config", "edmm.yaml"], tmp_path)
    assert unknown.returncode == 2 and "Shipped configs: " in unknown.stderr and "edm.yaml" in unknown.stderr
    listed = run(installed, ["data", "list"], tmp_path)
    assert listed.returncode == 0 and "fashionmnist" in listed.stdout


def test_the_public_api_resolves_and_import_stays_cheap():
    code = ("import sys, edm_lightning; assert 'torch' not in sys.modules, 'import edm_lightning imported torch'; "
            "[getattr(edm_lightning, name) for name in edm_lightning.__all__]; print(edm_lightning.__version__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() not in ("", "0+unknown")
