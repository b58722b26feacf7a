"""The attack configs through the CLI, on real FashionMNIST / MNIST (small subsets)."""

from pathlib import Path

import pytest

from edm_lightning.cli import main

CONFIGS = sorted(Path("configs/attack").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_attack_config_builds_its_attacker_and_victim_side(config, tmp_path):
    """Each config instantiates (victim loaded, shapes linked) against a freshly saved target checkpoint."""
    import lightning as L

    from edm_lightning.models import ClassifierModule

    checkpoint = tmp_path / "target.ckpt"
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(ClassifierModule())
    trainer.save_checkpoint(checkpoint)
    cli = main(["--config", str(config), f"--data.init_args.victim.checkpoint={checkpoint}",
                f"--data.init_args.cache_dir={tmp_path}"], run=False)
    assert cli.model.hparams.input_shape == (1, 28, 28) and cli.model.hparams.num_classes == 10
    assert cli.datamodule.queries_spent == 0


@pytest.mark.integration
def test_knockoff_cli_on_real_data(tmp_path):
    victim = tmp_path / "victim"
    main(["fit", "--config", "configs/baseline.yaml", "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", f"--trainer.default_root_dir={victim}",
          f"--trainer.callbacks.dirpath={victim}", "--data.init_args.train_size", "3000",
          "--data.init_args.val_size", "500"])
    checkpoint = victim / "best.ckpt"
    assert checkpoint.is_file()
    cli = main(["fit", "--config", "configs/attack/knockoff.yaml", "--trainer.max_epochs", "5",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                f"--trainer.default_root_dir={tmp_path / 'attack'}",
                f"--data.init_args.victim.checkpoint={checkpoint}", "--data.init_args.budget", "2000",
                "--data.init_args.test_size", "1000", f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    metrics = cli.trainer.callback_metrics
    assert cli.datamodule.oracle.queries_spent == 2000
    assert 0.15 < float(metrics["val/agreement"]) <= 1.0  # better than a constant guess on 10 classes
    assert len(list((tmp_path / "cache").glob("knockoff-*.pt"))) == 1
