"""The LightningCLI entry, driven as users drive it: ``main([...])`` with the committed configs."""

from pathlib import Path

import pytest
import torch

from edm_lightning import __main__ as command
from edm_lightning.cli import main
from tests.helpers.files import QUICK, localise_config


def test_fit_then_test_from_checkpoint(fake_root: Path, tmp_path: Path):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    cli = main(["fit", "--config", str(config), "--data.init_args.batch_size", "16", "--data.init_args.val_size", "40", *QUICK])
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.input_shape == (1, 28, 28)  # linked from data
    assert cli.model.hparams.mean == pytest.approx((0.2860,))
    best = tmp_path / "runs/baseline/checkpoints/best.ckpt"
    assert best.is_file() and (tmp_path / "runs/baseline/checkpoints/last.ckpt").is_file()

    cli = main(["test", "--config", str(config), "--ckpt_path", str(best), "--trainer.enable_progress_bar", "false"])
    acc = cli.trainer.callback_metrics["test/acc"].item()
    assert 0.0 <= acc <= 1.0


def test_config_can_be_saved_twice_in_one_folder(fake_root: Path, tmp_path: Path):
    """Sweeps and requeued jobs re-run into the same folder: saving config.yaml must not crash."""
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    args = ["fit", "--config", str(config), "--data.init_args.val_size", "40", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "same"), *QUICK]
    main(args)
    main(args)
    assert (tmp_path / "same" / "config.yaml").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.init_args.dataset", "fashion"], "Unknown dataset 'fashion'"),
        (["--model.init_args.arch", "alexnet"], "Unknown architecture 'alexnet'"),
        (["--model.init_args.optim.lr", "-1"], "optim.lr must be a finite number > 0"),
        (["--model.init_args.optim.lr", ".inf"], "optim.lr must be a finite number > 0, got inf"),
        (["--model.init_args.optim.weight_decay", ".nan"], "optim.weight_decay is NaN; no setting takes NaN"),
        (["--trainer.gradient_clip_val", ".nan"], "trainer.gradient_clip_val is NaN; no setting takes NaN"),
    ],
)
def test_bad_values_end_with_one_clear_message(fake_root: Path, tmp_path: Path, capsys, override, message):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *override, *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_data_names_the_fetch_command(tmp_path: Path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, tmp_path / "empty")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), *QUICK])
    assert "python -m edm_lightning.data fetch fashionmnist" in capsys.readouterr().err


@pytest.mark.parametrize("override", [["--model.init_args.not_a_key", "1"], ["--data.init_args.batch_size", "many"],
                                      ["--trainer.foo", "1"]])
def test_unknown_keys_and_wrong_types_are_rejected(fake_root: Path, tmp_path: Path, capsys, override):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.splitlines()) < 20, err  # the error, not a page of usage above it


def test_any_torch_optimiser_and_schedule_replace_the_models_own(fake_root: Path, tmp_path: Path):
    """LightningCLI's --optimizer/--lr_scheduler: SGD with StepLR instead of the config's Adam with cosine."""
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    main(["fit", "--config", str(config), "--data.init_args.val_size", "40", *QUICK, "--trainer.max_epochs", "2",
          "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1", "--optimizer.momentum", "0.5",
          "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1",
          "--lr_scheduler.gamma", "0.5"])
    state = torch.load(tmp_path / "runs/baseline/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    group = state["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.5 and "betas" not in group  # SGD's state, not Adam's
    # StepLR halves 0.1 after epoch 1; the last checkpoint is written before epoch 2's step.
    assert state["lr_schedulers"][0]["_last_lr"] == [pytest.approx(0.05)] and group["lr"] == pytest.approx(0.05)


def test_a_schedule_without_an_optimiser_is_refused(fake_root: Path, tmp_path: Path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *QUICK, "--lr_scheduler", "torch.optim.lr_scheduler.StepLR",
              "--lr_scheduler.step_size", "1"])
    assert exit_info.value.code == 2 and "--lr_scheduler was given without --optimizer" in capsys.readouterr().err


def test_one_optimiser_cannot_replace_dfmes_two(fake_root: Path, tmp_path: Path, capsys):
    config = localise_config("configs/attack/dfme.yaml", tmp_path, fake_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *QUICK, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"])
    assert exit_info.value.code == 2 and "steps its own optimisers" in capsys.readouterr().err


@pytest.mark.integration
def test_target_learns_real_fashionmnist(real_data_root: Path, tmp_path: Path):
    """Two epochs on 6,000 real FashionMNIST images: well above chance (10%) on the real test set."""
    config = localise_config("configs/baseline.yaml", tmp_path, real_data_root)
    main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--data.init_args.train_size", "6000",
          "--data.init_args.val_size", "1000", "--trainer.enable_progress_bar", "false"])
    cli = main(["test", "--config", str(config), "--ckpt_path", str(tmp_path / "runs/baseline/checkpoints/best.ckpt"),
                "--data.init_args.test_size", "2000", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.callback_metrics["test/acc"].item() > 0.7


def run_command(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``edm-lightning ARGS`` as the installed command runs it."""
    monkeypatch.setattr("sys.argv", ["/some/venv/bin/edm-lightning", *args])
    with pytest.raises(SystemExit) as exit_info:
        command.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("args", [(), ("--help",)])
def test_the_command_lists_every_subcommand_with_what_it_does(monkeypatch, capsys, args):
    code, out, err = run_command(monkeypatch, capsys, *args)
    listed = out if args else err
    assert code == (0 if args else 2)
    for name in ("fit", "validate", "test", "predict", "experiment", "data", "export", "serve"):
        assert f"\n  {name} " in listed
    assert "add-client" in listed


@pytest.mark.parametrize("tool", ["experiment", "data", "export", "serve"])
def test_each_subcommand_names_itself_as_the_user_called_it(monkeypatch, capsys, tool):
    code, out, _ = run_command(monkeypatch, capsys, tool, "--help")
    assert code == 0 and f"usage: edm-lightning {tool} " in out and "python -m" not in out.split("\n")[0]


def test_an_unknown_subcommand_is_refused_with_the_list(monkeypatch, capsys):
    code, _, err = run_command(monkeypatch, capsys, "experiments")
    assert code == 2 and "unknown command 'experiments'; choose one of: fit, validate" in err


@pytest.mark.parametrize("args, prefix", [
    (("fit", "--config", "configs/baseline.yaml", "--trainer.max_epoch", "2", "--print_config"), "--trainer.max_epoch"),
    (("test", "--config", "configs/baseline.yaml", "--ckpt_pat", "x.ckpt"), "--ckpt_pat"),
    (("experiment", "--config", "configs/experiment/fashionmnist.yaml", "--dry_ru", "true"), "--dry_ru"),
    (("data", "fetch", "mnist", "--roo", "elsewhere"), "--roo"),
    (("export", "--victim.checkpoint", "x.ckpt", "--forma", "onnx", "--out", "x.onnx"), "--forma"),
    (("serve", "--config", "configs/serve.yaml", "--por", "9000"), "--por"),
    (("serve", "add-client", "--file", "c.yaml", "--name", "a", "--budget", "1", "--budg", "2"), "--budg"),
])
def test_only_exact_option_names_are_accepted(monkeypatch, capsys, args, prefix):
    """argparse's prefix matching took --trainer.max_epoch as --trainer.max_epochs without a word."""
    monkeypatch.chdir(Path(__file__).parents[1])
    code, _, err = run_command(monkeypatch, capsys, *args)
    assert code == 2 and prefix in err and "unrecognized arguments" in err


def test_a_missing_prerequisite_names_the_commands_that_train_it(monkeypatch, tmp_path: Path, capsys):
    """From a fresh clone, the EDM + Adaptive Misinformation attack names every checkpoint it still needs, each with
    the config that trains it (the hint used to end in a literal `python main.py fit --config ...`)."""
    from edm_lightning.models import ClassifierModule, EnsembleModule
    from tests.helpers.files import REPO_ROOT, save_checkpoint

    monkeypatch.chdir(tmp_path)  # the config's runs/... paths are read from here: nothing trained yet
    config = str(REPO_ROOT / "configs/attack/knockoff_vs_edm_am.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "..." not in err, err
    for trained_by in ("edm", "hashnet", "misinformation"):
        assert f"Train it first (python main.py fit --config configs/{trained_by}.yaml)" in err
    (tmp_path / "runs/edm/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/hashnet/checkpoints").mkdir(parents=True)
    save_checkpoint(EnsembleModule(num_members=2), tmp_path / "runs/edm/checkpoints/best.ckpt")
    save_checkpoint(ClassifierModule(arch="small_cnn"), tmp_path / "runs/hashnet/checkpoints/best.ckpt")
    with pytest.raises(SystemExit):
        main(["fit", "--config", config])
    err = capsys.readouterr().err
    assert ("AdaptiveMisinformation: misinformation_model checkpoint 'runs/misinformation/checkpoints/best.ckpt' does "
            "not exist. Train it first (python main.py fit --config configs/misinformation.yaml).") in err
    assert "configs/edm.yaml" not in err and "configs/hashnet.yaml" not in err


def test_a_missing_ckpt_path_names_the_config_that_writes_it(monkeypatch, tmp_path: Path, capsys):
    from tests.helpers.files import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(REPO_ROOT / "configs/baseline.yaml"),
              "--ckpt_path", "runs/baseline/checkpoints/best.ckpt"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Train it first (python main.py fit --config configs/baseline.yaml)" in err


@pytest.mark.parametrize("override, message", [
    (["--target.optim", "{lr: .nan}"], "optim.lr must be a finite number > 0, got nan"),
    (["--edm.trainer", "{gradient_clip_val: .nan}"], "edm.trainer.gradient_clip_val is NaN"),
])
def test_the_experiment_ends_a_value_its_classes_refuse_in_one_line(monkeypatch, capsys, override, message):
    """A dataclass's own check (OptimConfig) raised through jsonargparse as a 29-line traceback, exit 1."""
    monkeypatch.chdir(Path(__file__).parents[1])
    code, _, err = run_command(monkeypatch, capsys, "experiment", "--config", "configs/experiment/fashionmnist.yaml",
                               *override, "--dry_run", "true")
    assert code == 2 and message in err and "Traceback" not in err


def test_the_command_says_its_version(monkeypatch, capsys):
    from importlib.metadata import version

    monkeypatch.setattr("sys.argv", ["edm-lightning", "--version"])
    command.main()
    assert capsys.readouterr().out.strip() == f"edm-lightning {version('edm-lightning')}"
