"""Every LightningCLI job ends with one line saying what it produced and where: the figures, the split and number of
images they are on, the checkpoint (and for an attack, the queries spent of its budget)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from edm_lightning.checkpoints import checkpoint_class, read_checkpoint
from edm_lightning.cli import main
from edm_lightning.errors import ConfigError
from tests.helpers.files import QUICK, REPO_ROOT, localise_config, save_victim

VICTIM_JOBS = sorted(path.relative_to(REPO_ROOT) for path in (REPO_ROOT / "configs").glob("*.yaml")
                     if "model" in yaml.safe_load(path.read_text()))  # serve.yaml is the API's, not a job
ATTACK_JOBS = sorted(path.relative_to(REPO_ROOT) for path in (REPO_ROOT / "configs/attack").glob("*.yaml"))

#: What makes each job's fit take seconds on the synthetic data (after QUICK, so these win).
KNOCKOFF = ["--data.init_args.budget", "160", "--data.init_args.batch_size", "32", "--data.init_args.test_size", "40"]
DATA_FREE = ["--data.init_args.budget", "300", "--data.init_args.batch_size", "16", "--data.init_args.steps_per_epoch", "3",
             "--data.init_args.test_size", "40", "--model.init_args.clone_steps", "2", "--model.init_args.latent_dim", "16",
             "--trainer.max_epochs", "2"]
JBDA = ["--data.init_args.seed_size", "20", "--data.init_args.budget", "40", "--data.init_args.batch_size", "16",
        "--data.init_args.test_size", "40", "--model.init_args.rounds", "1", "--model.init_args.epochs_per_round", "1",
        "--trainer.max_epochs", "2"]
TINY = {
    "activethief": ["--data.init_args.budget", "40", "--data.init_args.rounds", "1", "--data.init_args.batch_size", "16",
                    "--data.init_args.test_size", "40", "--model.init_args.rounds", "1",
                    "--model.init_args.epochs_per_round", "1", "--trainer.max_epochs", "2"],
    "dfme": DATA_FREE,
    "maze": [*DATA_FREE, "--model.init_args.directions", "2", "--model.init_args.replay_steps", "3"],
    "jbda": JBDA,
    "jbda_tr": JBDA,
}


def checkpoint_folder(local: Path) -> Path:
    """The ``dirpath`` of the (localised) config's ModelCheckpoint."""
    (folder,) = [c["init_args"]["dirpath"] for c in yaml.safe_load(local.read_text())["trainer"]["callbacks"]
                 if c["class_path"].endswith("ModelCheckpoint")]
    return Path(folder)


def last_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, "the job printed nothing"
    return lines[-1]


@pytest.mark.parametrize("config", VICTIM_JOBS, ids=lambda p: p.stem)
def test_every_victim_job_ends_with_its_figures_and_checkpoint(config, fake_root, tmp_path, capsys):
    local = localise_config(config, tmp_path, fake_root)
    main(["fit", "--config", str(local), *QUICK, "--trainer.max_epochs", "2", "--trainer.logger", "false",
          "--data.init_args.val_size", "40"])
    line = last_line(capsys)
    dataset = yaml.safe_load(local.read_text())["data"]["init_args"]["dataset"]
    assert line.startswith("fit: ") and f"on 40 validation images held out of {dataset}'s training split" in line, line
    assert re.search(r"val/acc \d+\.\d%", line) and re.search(r"\(best epoch, [12] of 2\)", line), line
    checkpoint = Path(line.rpartition("; checkpoint ")[2])
    assert checkpoint.resolve() == (checkpoint_folder(local) / "best.ckpt").resolve() and checkpoint.is_file()
    if "misinformation" in config.stem:  # monitored on val/loss: that figure first, the accuracy beside it
        assert re.search(r"^fit: val/loss [\d.e-]+, val/acc", line), line


@pytest.mark.parametrize("config", ATTACK_JOBS, ids=lambda p: p.stem)
def test_every_attack_job_ends_with_clone_accuracy_agreement_queries_and_its_checkpoint(config, fake_root, tmp_path,
                                                                                         capsys):
    local = localise_config(config, tmp_path, fake_root)
    save_victim(local)
    cli = main(["fit", "--config", str(local), *QUICK, "--trainer.logger", "false", *TINY.get(config.stem, KNOCKOFF)])
    line = last_line(capsys)
    spent, budget = cli.datamodule.queries_spent, cli.datamodule.hparams.budget
    assert re.fullmatch(r"fit: clone accuracy \d+\.\d%, agreement with the victim \d+\.\d% on 40 images of the victim's "
                        r"fashionmnist test split \(last epoch, \d+ of \d+\); "
                        rf"{spent:,} of {budget:,} queries spent; clone checkpoint \S+", line), line
    assert spent > 0
    checkpoint = Path(line.rpartition(" clone checkpoint ")[2])
    assert checkpoint.resolve() == (checkpoint_folder(local) / "last.ckpt").resolve() and checkpoint.is_file()
    assert checkpoint_class(read_checkpoint(checkpoint, "clone")) == type(cli.model).__name__


def test_the_clone_checkpoint_holds_the_clone_the_line_describes(fake_root, tmp_path, capsys):
    """The fit validates on the victim's test split: testing the kept checkpoint gives the line's figures again."""
    local = localise_config("configs/attack/knockoff.yaml", tmp_path, fake_root)
    save_victim(local)
    main(["fit", "--config", str(local), *QUICK, "--trainer.logger", "false", *KNOCKOFF])
    fitted = last_line(capsys)
    main(["test", "--config", str(local), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          *KNOCKOFF, "--ckpt_path", "last"])
    tested = last_line(capsys)
    figures = re.compile(r"clone accuracy \S+, agreement with the victim \S+ on 40 images of the victim's fashionmnist test "
                         r"split")
    assert figures.search(fitted).group() == figures.search(tested).group()
    assert tested.startswith("test: ") and tested.endswith(f"; checkpoint {fitted.rpartition(' clone checkpoint ')[2]}")


def test_a_test_job_names_the_split_and_the_checkpoint_it_tested(fake_root, tmp_path, capsys):
    local = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    main(["fit", "--config", str(local), *QUICK, "--trainer.logger", "false", "--data.init_args.val_size", "40"])
    capsys.readouterr()
    main(["test", "--config", str(local), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--ckpt_path", "best"])
    line = last_line(capsys)
    best = (tmp_path / "runs/baseline/checkpoints/best.ckpt").resolve()
    assert re.fullmatch(r"test: test/acc \d+\.\d% on 60 images of fashionmnist's test split; checkpoint \S+", line), line
    assert Path(line.rpartition("; checkpoint ")[2]).resolve() == best


def test_attack_configs_keep_each_clone_in_a_folder_of_its_own():
    """Runs against different victims are told apart by their folders, not by lightning_logs/version_N."""
    folders = {}
    for config in ATTACK_JOBS:
        job = yaml.safe_load((REPO_ROOT / config).read_text())
        (checkpoint,) = [c for c in job["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert job["trainer"]["callbacks"][-1] is checkpoint, f"{config}: --trainer.callbacks.dirpath moves the last one"
        assert checkpoint["init_args"]["save_last"] and not checkpoint["init_args"].get("monitor"), config  # never picked
        assert checkpoint["init_args"]["dirpath"].startswith(job["trainer"]["default_root_dir"] + "/"), config
        folders.setdefault(checkpoint["init_args"]["dirpath"], []).append(config.stem)
    assert all(len(configs) == 1 for configs in folders.values()), folders


class FailAfterTheFirstEpoch(Callback):
    """A fault in the middle of a fit, once the clone has been validated and kept once."""

    def on_train_epoch_end(self, trainer, pl_module):
        raise ConfigError("stopped by the test")


def test_a_failed_job_prints_no_line(fake_root, tmp_path, capsys):
    """A run stopped by an error did not produce what the line would claim."""
    local = localise_config("configs/attack/knockoff.yaml", tmp_path, fake_root)
    save_victim(local)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(local), *QUICK, "--trainer.logger", "false", *KNOCKOFF,
              f"--trainer.callbacks+={__name__}.FailAfterTheFirstEpoch"])
    assert exit_info.value.code == 2 and "stopped by the test" in capsys.readouterr().err
    assert "fit: " not in capsys.readouterr().out
