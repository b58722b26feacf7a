"""Wrong checkpoints are refused with a message, never silently evaluated (the CLI's --ckpt_path and the victim loader)."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch

from edm_lightning.attacks import KnockoffDataModule
from edm_lightning.checkpoints import CLASS_KEY
from edm_lightning.cli import main
from edm_lightning.data import ClassificationDataModule
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule
from tests.helpers.files import localise_config

QUICK_TEST = ["--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]


def lightning_checkpoint(module: lightning.LightningModule, path: Path, dataset: str | None = "fashionmnist",
                         cli: bool = True) -> Path:
    """A checkpoint as Lightning writes it: the class LightningCLI records, the DataModule's dataset, the weights."""
    hparams = dict(module.hparams)
    if cli:
        hparams["_class_path"] = f"edm_lightning.models.{type(module).__name__}"
    state = {"state_dict": module.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": lightning.__version__}
    if dataset is not None:
        state["datamodule_hyper_parameters"] = {"dataset": dataset}
    torch.save(state, path)
    return path


def run_test(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *args, *QUICK_TEST])
    return exit_info.value.code, capsys.readouterr().err


def test_an_ensemble_checkpoint_under_the_target_config_is_refused(fake_root, tmp_path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    ckpt = lightning_checkpoint(EnsembleModule(num_members=2), tmp_path / "edm.ckpt")
    code, err = run_test(["--config", str(config), "--ckpt_path", str(ckpt)], capsys)
    assert code == 2 and "holds a checkpoint of EnsembleModule, but the config builds ClassifierModule" in err


def test_a_target_checkpoint_under_the_edm_config_is_refused(fake_root, tmp_path, capsys):
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    ckpt = lightning_checkpoint(ClassifierModule(), tmp_path / "target.ckpt", cli=False)  # no class recorded either
    code, err = run_test(["--config", str(config), "--ckpt_path", str(ckpt)], capsys)
    assert code == 2 and "holds a single classifier, but the config builds EnsembleModule" in err


def test_a_member_count_other_than_the_configured_one_is_refused(fake_root, tmp_path, capsys):
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    ckpt = lightning_checkpoint(EnsembleModule(num_members=5), tmp_path / "edm5.ckpt")
    code, err = run_test(["--config", str(config), "--ckpt_path", str(ckpt), "--model.init_args.num_members", "3"], capsys)
    assert code == 2 and "num_members: checkpoint 5, config 3" in err


def test_a_checkpoint_of_another_dataset_is_refused(fake_root, tmp_path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    ckpt = lightning_checkpoint(ClassifierModule(), tmp_path / "animal.ckpt", dataset="animal-mnist")
    code, err = run_test(["--config", str(config), "--ckpt_path", str(ckpt)], capsys)
    assert code == 2 and "was trained on 'animal-mnist'" in err


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"PK\x03\x04 truncated", "not a readable Lightning checkpoint"),
    ({"state_dict": {}, "hyper_parameters": None}, "not a Lightning checkpoint with hyper-parameters"),
    ([torch.zeros(2)], "not a Lightning checkpoint with hyper-parameters"),
], ids=["missing", "truncated", "hparams-none", "pickled-list"])
def test_unreadable_ckpt_paths_end_with_one_message(fake_root, tmp_path, capsys, content, message):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    path = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    code, err = run_test(["--config", str(config), "--ckpt_path", str(path)], capsys)
    assert code == 2 and message in err and "bad.ckpt" in err and "Traceback" not in err


def test_a_runner_checkpoint_is_tested_through_the_cli(fake_root, tmp_path):
    """The experiment runner builds its models in Python (hyper-parameters hold an OptimConfig, no class path)."""
    module = ClassifierModule(mean=(0.2860,), std=(0.3530,))
    trainer = lightning.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = ClassificationDataModule("fashionmnist", str(fake_root), batch_size=16, val_size=40)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "runner.ckpt")
    assert torch.load(tmp_path / "runner.ckpt", weights_only=True)[CLASS_KEY] == "ClassifierModule"
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    cli = main(["test", "--config", str(config), "--ckpt_path", str(tmp_path / "runner.ckpt"), *QUICK_TEST])
    assert 0.0 <= cli.trainer.callback_metrics["test/acc"] <= 1.0


def test_a_hash_network_or_a_misinformation_model_is_not_a_victim(fake_root, tmp_path):
    hashnet = lightning_checkpoint(ClassifierModule(arch="small_cnn"), tmp_path / "hash.ckpt", dataset="animal-mnist")
    with pytest.raises(ConfigError, match="trained on 'animal-mnist', but the attack measures it on 'fashionmnist'"):
        KnockoffDataModule(VictimConfig(str(hashnet)), root=str(fake_root), cache_dir=str(tmp_path))
    misinformation = lightning_checkpoint(MisinformationModule(), tmp_path / "mis.ckpt", cli=False)
    misinformation_state = torch.load(misinformation, weights_only=True)
    misinformation_state[CLASS_KEY] = "MisinformationModule"  # what the module's own on_save_checkpoint records
    torch.save(misinformation_state, misinformation)
    with pytest.raises(ConfigError, match="is a MisinformationModule checkpoint; a victim is a target"):
        VictimConfig(str(misinformation)).build()


def test_a_target_is_not_a_hash_network(tmp_path):
    ensemble = lightning_checkpoint(EnsembleModule(num_members=2), tmp_path / "edm.ckpt")
    target = lightning_checkpoint(ClassifierModule(arch="small_cnn"), tmp_path / "target.ckpt")  # fashionmnist too
    with pytest.raises(ConfigError, match="trained on 'fashionmnist', the ensemble's own data: that is a target"):
        VictimConfig(str(ensemble), router="neural", hash_checkpoint=str(target)).build()
    misinformation = lightning_checkpoint(MisinformationModule(arch="small_cnn"), tmp_path / "mis.ckpt", dataset=None)
    with pytest.raises(ConfigError, match="is a MisinformationModule checkpoint; train the hash network"):
        VictimConfig(str(ensemble), router="neural", hash_checkpoint=str(misinformation)).build()


@pytest.mark.parametrize("name", ["last", "best"])
def test_a_checkpoint_name_that_resolves_to_no_file_is_an_error(fake_root, tmp_path, capsys, name):
    """Lightning resolves best/last from the same process's fit: a new test process tested the untrained model."""
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    code, err = run_test(["--config", str(config), "--ckpt_path", name], capsys)
    expected = tmp_path / "runs/baseline/checkpoints" / ("last.ckpt" if name == "last" else "best.ckpt")
    assert code == 2 and f"--ckpt_path {name}: there is no {expected}. Train it first" in err


def test_last_names_the_configured_checkpoint_callbacks_last_file(fake_root, tmp_path):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    folder = tmp_path / "runs/baseline/checkpoints"
    folder.mkdir(parents=True)
    module = ClassifierModule(mean=(0.2860,), std=(0.3530,))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()  # every class scores 0: argmax is class 0, so accuracy is class 0's share
    lightning_checkpoint(module, folder / "last.ckpt")
    cli = main(["test", "--config", str(config), "--ckpt_path", "last", *QUICK_TEST])
    assert cli.config.test.ckpt_path == str(folder / "last.ckpt")
    labels = torch.cat([y for _, y in cli.datamodule.test_dataloader()][:1])
    assert cli.trainer.callback_metrics["test/acc"] == pytest.approx((labels == 0).float().mean().item())


def test_an_empty_checkpoint_name_is_an_error(fake_root, tmp_path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    code, err = run_test(["--config", str(config), "--ckpt_path", ""], capsys)
    assert code == 2 and "--ckpt_path is empty" in err and "Traceback" not in err


def test_hpc_names_the_newest_preemption_checkpoint_or_is_an_error(fake_root, tmp_path, capsys):
    config = localise_config("configs/baseline.yaml", tmp_path, fake_root)
    code, err = run_test(["--config", str(config), "--ckpt_path", "hpc"], capsys)
    assert code == 2 and "there is no hpc_ckpt_<N>.ckpt in" in err
    folder = tmp_path / "runs/baseline"
    folder.mkdir(parents=True)
    for n in (2, 10):
        lightning_checkpoint(ClassifierModule(mean=(0.2860,), std=(0.3530,)), folder / f"hpc_ckpt_{n}.ckpt")
    (folder / "hpc_ckpt_x.ckpt").write_text("not Lightning's name")
    cli = main(["test", "--config", str(config), "--ckpt_path", "hpc", *QUICK_TEST])
    assert cli.config.test.ckpt_path == str(folder / "hpc_ckpt_10.ckpt")  # 10 > 2, numerically
