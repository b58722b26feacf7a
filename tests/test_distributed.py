"""Multi-process training on CPU (gloo): DDP in a clean subprocess, ddp_spawn in-process, SLURM detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from edm_lightning.cli import main
from tests.helpers.files import QUICK, REPO_ROOT, localise_config

_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any launcher, SLURM or Lightning state a parent process may carry."""
    env = {k: v for k, v in os.environ.items() if not (k in _LAUNCHER_VARS or k.startswith(("SLURM_", "PL_", "TORCHELASTIC_")))}
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "main.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"metrics-rank{rank}.json").read_text())


def validate_on_one_and_two_processes(common: list[str], ckpt: Path, out: Path) -> tuple[dict, dict, dict]:
    """``validate`` of one checkpoint in one process and under 2-process DDP: the dumped metrics of the
    single process, DDP rank 0 and DDP rank 1."""
    single, double = out / "single", out / "ddp"
    for folder, extra in ((single, []), (double, ["--config", "configs/trainer/cpu_ddp2.yaml"])):
        run_cli(["validate", *common, *extra, "--ckpt_path", str(ckpt),
                 "--trainer.callbacks+=tests.helpers.callbacks.DumpMetrics",
                 f"--trainer.callbacks.dir={folder}"], clean_env())
    return read_metrics(single), read_metrics(double, 0), read_metrics(double, 1)


def test_ddp_metrics_match_a_single_process(fake_root: Path, tmp_path: Path):
    """Two gloo processes validating one checkpoint report what one process reports: metrics are synced."""
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    common = ["--config", str(config), "--data.init_args.val_size", "40", "--data.init_args.batch_size", "10",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    run_cli(["fit", *common, "--trainer.max_epochs", "1"], clean_env())
    one, rank0, rank1 = validate_on_one_and_two_processes(common, tmp_path / "runs/baseline/checkpoints/last.ckpt", tmp_path)
    assert (one["world_size"], rank0["world_size"]) == (1, 2)
    assert rank0["metrics"]["val/acc"] == pytest.approx(one["metrics"]["val/acc"], abs=1e-6)
    assert rank1["metrics"]["val/acc"] == pytest.approx(one["metrics"]["val/acc"], abs=1e-6)
    assert rank0["metrics"]["val/loss"] == pytest.approx(one["metrics"]["val/loss"], rel=1e-4)


def test_ddp_fit_of_the_ensemble_routes_identically_on_every_rank(fake_root: Path, tmp_path: Path):
    """EDM under DDP: both ranks train, sync metrics, and send a fixed batch to the same members."""
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    common = ["--config", str(config), "--data.init_args.val_size", "40", "--data.init_args.batch_size", "10",
              "--model.init_args.num_members", "3", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    run_cli(["fit", *common, "--config", "configs/trainer/cpu_ddp2.yaml", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "4", "--trainer.callbacks+=tests.helpers.callbacks.RecordRouting",
             f"--trainer.callbacks.dir={tmp_path / 'routing'}"], clean_env())
    rank0 = json.loads((tmp_path / "routing/routing-rank0.json").read_text())
    rank1 = json.loads((tmp_path / "routing/routing-rank1.json").read_text())
    assert rank0 == rank1 and len(set(rank0)) > 1  # same members on both ranks, and more than one in use
    single, rank0, _ = validate_on_one_and_two_processes(common, tmp_path / "runs/edm/checkpoints/last.ckpt", tmp_path)
    one, two = single["metrics"], rank0["metrics"]
    for key in ("val/acc", "val/member_0/acc", "val/ood/coherence"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_ddp_knockoff_spends_its_budget_once(fake_root: Path, tmp_path: Path):
    """Under DDP the transfer set is bought by one process and read back by the other: one budget, not two."""
    target = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    run_cli(["fit", "--config", str(target), "--data.init_args.val_size", "40", "--trainer.logger", "false", *QUICK],
            clean_env())
    attack = localise_config("configs/attack/knockoff.yaml", tmp_path, fake_root)
    victim = str(tmp_path / "runs/baseline/checkpoints/best.ckpt")
    run_cli(["fit", "--config", str(attack), "--config", "configs/trainer/cpu_ddp2.yaml", "--trainer.logger", "false",
             f"--data.init_args.victim.checkpoint={victim}", "--data.init_args.budget", "160",
             "--data.init_args.batch_size", "16", "--data.init_args.test_size", "40", "--trainer.max_epochs", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=tests.helpers.callbacks.DumpQueries",
             f"--trainer.callbacks.dir={tmp_path / 'queries'}"], clean_env())
    ranks = [json.loads((tmp_path / f"queries/queries-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["opened_oracle"] for r in ranks] == [True, False]  # only rank 0 ever held the victim's door open
    assert ranks[0]["queries_spent"] == 160 and ranks[1]["train_items"] == 160  # rank 1 read the same 160 answers
    assert not ranks[0]["per_node"]  # global rank 0 buys, not the first process of every node


def test_ddp_fit_creates_one_wandb_run(fake_root: Path, tmp_path: Path):
    """Only rank 0 talks to W&B: two processes, one (offline) run."""
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    env = clean_env(WANDB_MODE="offline")
    run_cli(["fit", "--config", str(config), "--config", "configs/trainer/cpu_ddp2.yaml",
             "--config", "configs/logger/wandb.yaml", "--data.init_args.val_size", "40", *QUICK], env)
    assert len(list((tmp_path / "runs/baseline/wandb").glob("offline-run-*"))) == 1
    assert (tmp_path / "runs/baseline/checkpoints/last.ckpt").is_file()


def test_ddp_spawn_in_process(fake_root: Path, tmp_path: Path):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    cli = main(["fit", "--config", str(config), "--data.init_args.val_size", "40", "--trainer.accelerator", "cpu",
                "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", *QUICK])
    assert cli.trainer.world_size == 2
    assert 0.0 <= cli.trainer.callback_metrics["val/acc"].item() <= 1.0


SLURM_RANK3_OF_4 = {
    "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_JOB_NAME": "edm-lightning", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "node[1-2]",
}


def test_slurm_environment_gives_ranks_and_world_size(monkeypatch):
    # The Trainer sets the process-wide rank_zero_only.rank to 3; restore it afterwards, or every later
    # test in this process would log as a non-zero rank (dummy W&B experiments, no CSV files).
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    for key in _LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM_RANK3_OF_4.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (3, 1, 1, 4)


def test_cluster_configs_compose_as_the_sbatch_script_does(capsys):
    """The srun command line of scripts/slurm/train.sbatch parses (GPU trainer, requeue plugin, 2 nodes)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/baseline.yaml", "--config", "configs/trainer/gpu_ddp.yaml",
              "--config", "configs/trainer/slurm_requeue.yaml", "--trainer.devices", "8", "--trainer.num_nodes", "2",
              "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "SLURMEnvironment" in printed and "auto_requeue: true" in printed and "num_nodes: 2" in printed
    sbatch = (REPO_ROOT / "scripts/slurm/train.sbatch").read_text()
    assert "--ntasks-per-node=8" in sbatch and "--trainer.devices \"$SLURM_NTASKS_PER_NODE\"" in sbatch


def test_requeued_slurm_job_resumes_from_the_hpc_checkpoint(monkeypatch, fake_root: Path, tmp_path: Path):
    """After a pre-emption Lightning saved hpc_ckpt_N.ckpt; the requeued job continues from its step."""
    for key in _LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    single_task = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                   "SLURM_NODEID": "0", "SLURM_JOB_NAME": "edm-lightning", "SLURM_JOB_ID": "7", "SLURM_NODELIST": "node1"}
    for key, value in single_task.items():
        monkeypatch.setenv(key, value)
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    root = tmp_path / "job"
    args = ["fit", "--config", str(config), "--data.init_args.val_size", "40", "--data.init_args.batch_size", "16",
            "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=tests.helpers.callbacks.DumpMetrics",
            f"--trainer.callbacks.dir={tmp_path / 'metrics'}"]
    first = main([*args, "--trainer.max_epochs", "1"])
    first.trainer.save_checkpoint(root / "hpc_ckpt_1.ckpt")  # what the SIGUSR1 handler writes before requeueing
    main([*args, "--trainer.max_epochs", "2"])
    record = read_metrics(tmp_path / "metrics")
    assert (record["start_step"], record["start_epoch"], record["end_step"]) == (3, 1, 6)
