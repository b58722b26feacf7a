"""W&B sweep files: valid against the sweep schema offline, and every proposal is a command LightningCLI parses."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from edm_lightning.cli import main
from tests.helpers.files import REPO_ROOT, localise_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the sweeps package still uses pydantic v1 names
    import sweeps
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

SWEEP_FILES = sorted((REPO_ROOT / "configs/sweeps").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def proposals(config: dict, count: int) -> list[dict]:
    """The first ``count`` runs the sweep controller would propose (all of a grid), as W&B computes them."""
    runs = []
    for _ in range(count):
        run = sweeps.next_run(config, runs)
        if run is None:
            break
        run.state = sweeps.RunState.finished
        run.summary_metrics = {config["metric"]["name"]: 0.5}
        runs.append(run)
    return [{key: value["value"] for key, value in run.config.items()} for run in runs]


def command_line(config: dict, params: dict) -> list[str]:
    """The agent's command after ``${env} ${interpreter} ${program}``, with ``${args}`` rendered by W&B's own code."""
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    rendered = []
    for part in config["command"]:
        if part in ("${env}", "${interpreter}", "${program}"):
            continue
        rendered += args if part == "${args}" else [part]
    return rendered


def test_there_are_sweeps_for_edm_and_the_clone():
    names = {path.stem for path in SWEEP_FILES}
    assert {"edm_lambda", "clone_lr"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_validates_against_the_schema(path: Path):
    config = load(path)
    assert sweeps.schema_violations_from_proposed_config(config) == []
    assert config["program"] == "main.py"
    assert config["command"][3] == "fit", "the LightningCLI subcommand must come first"
    assert "${args}" in config["command"] and "${args_no_hyphens}" not in config["command"]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_proposal_parses_with_each_key_in_place(path: Path, capsys):
    config = load(path)
    runs = proposals(config, 50 if config["method"] == "grid" else 3)
    if config["method"] == "grid":
        expected = 1
        for spec in config["parameters"].values():
            expected *= len(spec["values"])
        assert len(runs) == expected
    for params in runs:
        with pytest.raises(SystemExit) as exit_info:
            main([*command_line(config, params), "--print_config"])
        assert exit_info.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        for key, value in params.items():
            node = printed
            for part in key.split("."):
                node = node[part]
            assert node == value, f"{key}: swept {value!r}, LightningCLI got {node!r}"


@pytest.mark.integration
def test_one_edm_proposal_runs_end_to_end_with_wandb_disabled(monkeypatch, fake_root: Path, tmp_path: Path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = load(REPO_ROOT / "configs/sweeps/edm_lambda.yaml")
    params = proposals(config, 4)[-1]
    args = command_line(config, params)
    args[args.index("configs/edm.yaml")] = str(localise_config("configs/edm.yaml", tmp_path, fake_root))
    cli = main([*args, "--data.init_args.val_size", "40", "--data.init_args.batch_size", "16", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false"])
    assert cli.model.hparams.diversity_weight == params["model.init_args.diversity_weight"]
    assert cli.model.hparams.num_members == params["model.init_args.num_members"]
    assert cli.trainer.state.finished
