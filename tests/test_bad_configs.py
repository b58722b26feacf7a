"""Configuration mistakes are refused (or read as meant) before anything runs: the CLI, sweeps, SLURM, the runner."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict

import pytest
import yaml

from edm_lightning.attacks import KnockoffDataModule
from edm_lightning.cli import main
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.experiment.__main__ import main as experiment_main
from tests.helpers.experiment import tiny_config
from tests.helpers.files import QUICK, REPO_ROOT, localise_config
from tests.helpers.victims import linear_victim


def test_a_whole_number_of_batches_is_a_count_not_the_whole_epoch(fake_root, tmp_path):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    cli = main(["--config", str(config), "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0.5",
                "--trainer.logger=false"], run=False)
    assert cli.trainer.limit_train_batches == 1 and isinstance(cli.trainer.limit_train_batches, int)
    assert cli.trainer.limit_val_batches == 0.5


def test_a_swept_null_arrives_as_null_not_the_string_none(fake_root, tmp_path):
    """W&B renders a swept null as --key=None (its own create_sweep_command_args does)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    rendered = create_sweep_command_args({"args": {"data.init_args.test_size": {"value": None}}})["args"]
    assert rendered == ["--data.init_args.test_size=None"]
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    cli = main(["--config", str(config), *rendered, "--data.init_args.train_size", "None", "--trainer.logger=false"],
               run=False)
    assert cli.datamodule.hparams.test_size is None and cli.datamodule.hparams.train_size is None
    with pytest.raises(SystemExit) as exit_info:  # null where no null is allowed: refused, not a TypeError later
        main(["--config", str(config), "--data.init_args.val_size=None", "--trainer.logger=false"], run=False)
    assert exit_info.value.code == 2


def test_an_empty_config_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    for entry in (lambda: main(["fit", "--config", str(empty)]), lambda: experiment_main(["--config", str(empty)])):
        with pytest.raises(SystemExit) as exit_info:
            entry()
        assert exit_info.value.code == 2
        assert f"config file {str(empty)!r} is empty" in capsys.readouterr().err


def test_knockoff_refuses_the_victims_own_dataset_as_surrogate(tmp_path):
    with pytest.raises(ConfigError, match="must not be the victim's own dataset 'fashionmnist'"):
        KnockoffDataModule(linear_victim(), dataset="fashionmnist", surrogate="fashionmnist", cache_dir=str(tmp_path))


def test_a_rerun_replaces_best_ckpt_instead_of_writing_best_v1(fake_root, tmp_path):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    args = ["fit", "--config", str(config), "--data.init_args.val_size", "40", "--trainer.logger=false", *QUICK]
    main(args)
    first = (tmp_path / "runs/baseline/checkpoints/best.ckpt").stat().st_mtime_ns
    main(args)
    files = sorted(path.name for path in (tmp_path / "runs/baseline/checkpoints").iterdir())
    assert files == ["best.ckpt", "last.ckpt"]
    assert (tmp_path / "runs/baseline/checkpoints/best.ckpt").stat().st_mtime_ns > first


def test_the_slurm_script_refuses_fewer_tasks_than_nodes_times_tasks_per_node(tmp_path):
    env = {**os.environ, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NAME": "test", "SLURM_JOB_ID": "1",
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "srun").write_text("#!/bin/sh\necho srun-called\n")
    (tmp_path / "srun").chmod(0o755)
    script = REPO_ROOT / "scripts/slurm/train.sbatch"
    refused = subprocess.run(["bash", str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "SLURM_NTASKS=1 but 1 node(s) x 2 tasks per node" in refused.stderr
    assert "srun-called" not in refused.stdout
    accepted = subprocess.run(["bash", str(script)], cwd=REPO_ROOT, env={**env, "SLURM_NTASKS": "2"},
                              capture_output=True, text=True)
    assert accepted.returncode == 0 and "srun-called" in accepted.stdout


@pytest.mark.parametrize("init_args, message", [
    ({"betaa": 0.3}, "Option 'betaa' is not accepted. Its arguments: beta, gamma"),
    ({"beta": "high"}, "Expected a <class 'float'>"),
], ids=["misspelt-argument", "wrong-type"])
def test_a_postprocessors_arguments_are_checked_when_the_config_is_parsed(tmp_path, capsys, init_args, message):
    """Even --print_config (which builds nothing) refuses them; from Python, VictimConfig does."""
    overlay = tmp_path / "defense.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"init_args": {"victim": {"postprocessors": [
        {"class_path": "ReverseSigmoid", "init_args": init_args}]}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/attack/knockoff_vs_edm_rs.yaml", "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"postprocessors\[0\] \(ReverseSigmoid\)"):
        VictimConfig("victim.ckpt", postprocessors=[{"class_path": "ReverseSigmoid", "init_args": init_args}])


def test_a_setting_lightning_refuses_is_one_message(fake_root, tmp_path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.max_epochs", "-5", "--trainer.logger=false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "`max_epochs` must be a non-negative integer" in err and "Traceback" not in err


@pytest.mark.parametrize("options, message", [
    ({"query_copies": 0}, "attack knockoff (budget 64): query_copies must be an integer >= 1"),
    ({"copy_noise": float("nan")}, "attacks[0].options.copy_noise is NaN; no setting takes NaN"),  # any setting's NaN
    ({"copy_noise": float("inf")}, "attack knockoff (budget 64): copy_noise must be in [0, 1]"),
], ids=["no-copies", "nan-noise", "infinite-noise"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_an_experiment_refuses_what_its_attack_stages_would_before_any_stage(fake_root, tmp_path, capsys, options, message,
                                                                            dry_run):
    """Before: query_copies 0 ended in a ZeroDivisionError traceback; copy_noise NaN trained every victim, then failed
    every attack stage. Now the attack's own check (the one its stage runs) refuses them first: one line, exit 2."""
    config = asdict(tiny_config(fake_root, tmp_path, dry_run=dry_run))
    config["attacks"][0]["options"].update(options)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))  # NaN and infinity as YAML writes them: .nan, .inf
    with pytest.raises(SystemExit) as exit_info:
        experiment_main(["--config", str(path)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert f"error: {message}" in captured.err and "Traceback" not in captured.err
    assert captured.out == "" and not (tmp_path / "runs").exists()  # no plan printed, no stage started
