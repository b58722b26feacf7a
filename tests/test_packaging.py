"""The package works when installed from its wheel, outside the clone: the edm-lightning command and its configs."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.files import REPO_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel ``python -m build`` makes of this tree (through its sdist), installed into a fresh virtualenv.

    The virtualenv sees the packages of the environment running the tests (torch and the rest of the stack; a
    virtualenv's own when the suite runs in one, which ``--system-site-packages`` would not give: it exposes the
    base interpreter's) through a ``.pth`` file naming its site directories, but not the clone's ``edm_lightning``:
    a path line does not run the ``.pth`` files of that directory (an editable install's finder among them), and
    the wheel is installed into the virtualenv itself, which comes first on its path.
    """
    root = tmp_path_factory.mktemp("installed")
    wheels, venv = root / "wheels", root / "venv"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(wheels), str(REPO_ROOT)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("edm_lightning-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    own = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    parent = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(own) / "_tested_environment.pth").write_text("".join(f"{path}\n" for path in parent if Path(path).is_dir()))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    return venv, env


def run(installed, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    venv, env = installed
    return subprocess.run([str(venv / "bin" / "edm-lightning"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.integration
def test_the_installed_command_runs_a_job_from_a_shipped_config(installed, tmp_path, real_data_root):
    python = str(installed[0] / "bin" / "python")
    where = subprocess.run([python, "-c", "import edm_lightning; print(edm_lightning.__file__)"], cwd=tmp_path,
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


@pytest.mark.parametrize("hidden, call, extra", [
    ("submitit", "from edm_lightning.experiment.__main__ import main; "
                 "main(['--config', 'experiment/fashionmnist.yaml', '--executor', 'submitit_local', '--dry_run', 'true'])",
     "cluster"),
    ("fastapi", "from edm_lightning.serve.__main__ import main; main(['--victim.checkpoint', 'edm.ckpt'])", "serve"),
    ("onnxscript", "from edm_lightning.export.__main__ import main; main(['--victim.checkpoint', 'edm.ckpt'])", "serve"),
])
def test_a_missing_extra_is_named_with_its_pip_command(tmp_path, hidden, call, extra):
    """The extra's package hidden (as if not installed): the command says which extra to install."""
    code = f"import sys; sys.modules[{hidden!r}] = None; {call}"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"pip install 'edm-lightning[{extra}]'" in result.stderr and "Traceback" not in result.stderr
