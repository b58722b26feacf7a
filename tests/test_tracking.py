"""W&B: offline fallback without credentials, the resolved config logged, one run per job."""

from pathlib import Path

import lightning as L
import pytest
import yaml

from edm_lightning import tracking
from edm_lightning.cli import main
from tests.helpers.files import QUICK, REPO_ROOT, localise_config

pytestmark = pytest.mark.usefixtures("fresh_wandb_session")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path: Path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(tracking, "_told_offline", False)


def test_without_credentials_runs_go_offline_and_say_so_once(no_credentials, capsys):
    assert tracking.resolve_wandb_mode() == "offline"
    assert tracking.resolve_wandb_mode() == "offline"
    assert capsys.readouterr().err.count("W&B: no credentials found") == 1


def test_explicit_mode_and_credentials_are_respected(no_credentials, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert tracking.resolve_wandb_mode() == "online"


def _wandb_loggers(node):
    if isinstance(node, dict):
        if str(node.get("class_path", "")).endswith("WandbLogger"):
            yield node.get("init_args", {})
        for value in node.values():
            yield from _wandb_loggers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _wandb_loggers(value)


def test_wandb_is_one_logger_config_that_every_job_composes():
    root = Path(__file__).resolve().parents[1]
    jobs = sorted(path for path in [*root.glob("configs/*.yaml"), *root.glob("configs/attack/*.yaml")]
                  if "model" in yaml.safe_load(path.read_text()))  # LightningCLI jobs (serve.yaml is the API's)
    assert len(jobs) >= 8
    for config in jobs:
        assert not list(_wandb_loggers(yaml.safe_load(config.read_text()))), f"{config}: compose configs/logger/wandb.yaml"
        assert "--config configs/logger/wandb.yaml" in config.read_text(), f"{config} does not say how to log to W&B"
    (init_args,) = _wandb_loggers(yaml.safe_load((root / "configs/logger/wandb.yaml").read_text()))
    assert "mode" not in init_args, "a committed `mode` beats WANDB_MODE"
    assert init_args["project"] == "edm-lightning"
    for sweep in sorted(root.glob("configs/sweeps/*.yaml")):
        assert "configs/logger/wandb.yaml" in yaml.safe_load(sweep.read_text())["command"], sweep
    assert "--config configs/logger/wandb.yaml" in (root / "scripts/slurm/train.sbatch").read_text()


def test_the_job_fills_in_what_the_logger_config_leaves_open_and_explicit_values_win(monkeypatch, fake_root, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    logger = str(REPO_ROOT / "configs/logger/wandb.yaml")
    cli = main(["--config", str(config), "--config", logger], run=False)
    init = cli.trainer.logger._wandb_init
    assert init["job_type"] == "edm" and init["group"] == "fashionmnist" and init["tags"] == ["fashionmnist", "lenet5"]
    assert init["dir"] == str(tmp_path / "runs/edm")  # save_dir: the trainer's default_root_dir
    cli = main(["--config", str(config), "--config", logger, "--trainer.logger.init_args.job_type", "mine",
                "--trainer.logger.init_args.save_dir", str(tmp_path / "elsewhere")], run=False)
    assert cli.trainer.logger._wandb_init["job_type"] == "mine"
    assert cli.trainer.logger._wandb_init["dir"] == str(tmp_path / "elsewhere")


class _Snapshot(L.Callback):
    """Copies what the live W&B run holds at the end of fit (the run itself is closed afterwards)."""

    runs: list[dict] = []

    def on_fit_end(self, trainer, pl_module):
        run = trainer.logger.experiment
        _Snapshot.runs.append({"id": run.id, "config": dict(run.config), "summary": dict(run.summary),
                               "job_type": run.job_type, "group": run.group, "tags": list(run.tags)})


def test_offline_run_logs_config_and_metrics_and_each_job_gets_its_own_run(
    no_credentials, fake_root: Path, tmp_path: Path
):
    _Snapshot.runs.clear()
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    args = ["fit", "--config", str(config), "--config", str(REPO_ROOT / "configs/logger/wandb.yaml"),
            "--data.init_args.val_size", "40", "--trainer.callbacks+=tests.test_tracking._Snapshot", *QUICK]
    main(args)
    main(args)
    first, second = _Snapshot.runs
    assert first["id"] != second["id"]  # wandb.finish() ran between the two jobs
    assert (first["job_type"], first["group"], first["tags"]) == ("baseline", "fashionmnist", ["fashionmnist", "lenet5"])
    cli_config = first["config"]["cli"]
    assert cli_config["data"]["init_args"]["dataset"] == "fashionmnist"
    assert cli_config["model"]["init_args"]["arch"] == "lenet5"
    assert first["config"]["num_classes"] == 10  # the model's own hyper-parameters, linked from data
    assert "val/acc" in first["summary"] and 0.0 <= first["summary"]["val/acc"] <= 1.0
    assert len(list((tmp_path / "runs/baseline/wandb").glob("offline-run-*"))) == 2


def test_a_dumped_config_naming_the_loggers_module_path_also_goes_offline(no_credentials, fake_root: Path, tmp_path: Path):
    """A config.yaml the CLI (or the experiment runner) dumped names ``lightning.pytorch.loggers.wandb.WandbLogger``; run
    by hand without credentials it must log offline like ``configs/logger/wandb.yaml`` does, not fail in wandb.init."""
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    logger = tmp_path / "dumped_logger.yaml"
    logger.write_text("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.wandb.WandbLogger\n"
                      "    init_args: {project: edm-lightning-test}\n")
    cli = main(["fit", "--config", str(config), "--config", str(logger), "--data.init_args.val_size", "40", *QUICK])
    assert cli.trainer.state.finished
    assert len(list((tmp_path / "runs/baseline/wandb").glob("offline-run-*"))) == 1  # save_dir filled in as well


def test_disabled_mode_trains_without_writing_runs(monkeypatch, fake_root: Path, tmp_path: Path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    cli = main(["fit", "--config", str(config), "--data.init_args.val_size", "40", *QUICK])
    assert cli.trainer.state.finished
    assert not list((tmp_path / "runs/baseline").glob("wandb/offline-run-*"))
