"""The attack configs through the CLI, on real FashionMNIST / MNIST (small subsets)."""

from pathlib import Path

import pytest

from edm_lightning.cli import main

CONFIGS = sorted(Path("configs/attack").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_attack_config_builds_its_attacker_and_victim_side(config, tmp_path):
    """Each config instantiates (victim loaded, shapes linked, post-processors built) against freshly saved
    checkpoints at the paths it names: a target or an ensemble, a hash network, a misinformation model."""
    import yaml

    from tests.helpers.files import REPO_ROOT, localise_config, save_victim

    local = localise_config(config, tmp_path, REPO_ROOT / "data")
    save_victim(local, members=3)
    victim = yaml.safe_load(local.read_text())["data"]["init_args"]["victim"]
    ensemble = victim.get("router", "fixed") != "fixed"
    cli = main(["--config", str(local), f"--data.init_args.cache_dir={tmp_path}"], run=False)
    assert cli.model.hparams.input_shape == (1, 28, 28) and cli.model.hparams.num_classes == 10
    assert cli.datamodule.queries_spent == 0
    served = cli.datamodule._victim_to_serve
    assert len(served.members) == (3 if ensemble else 1)
    assert [type(p).__name__ for p in served.postprocessors] == [s["class_path"] for s in victim.get("postprocessors", [])]


@pytest.mark.integration
def test_knockoff_cli_on_real_data(tmp_path, real_data_root):
    victim = tmp_path / "victim"
    main(["fit", "--config", "configs/baseline.yaml", f"--data.init_args.root={real_data_root}",
          "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", f"--trainer.default_root_dir={victim}",
          f"--trainer.callbacks.dirpath={victim}", "--data.init_args.train_size", "3000",
          "--data.init_args.val_size", "500"])
    checkpoint = victim / "best.ckpt"
    assert checkpoint.is_file()
    cli = main(["fit", "--config", "configs/attack/knockoff.yaml", f"--data.init_args.root={real_data_root}",
                "--trainer.max_epochs", "5",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                f"--trainer.default_root_dir={tmp_path / 'attack'}",
                f"--data.init_args.victim.checkpoint={checkpoint}", "--data.init_args.budget", "2000",
                "--data.init_args.test_size", "1000", f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    metrics = cli.trainer.callback_metrics
    assert cli.datamodule.oracle.queries_spent == 2000
    assert 0.15 < float(metrics["val/agreement"]) <= 1.0  # better than a constant guess on 10 classes
    assert len(list((tmp_path / "cache").glob("knockoff-*.pt"))) == 1


def test_python_and_the_configs_cache_purchases_in_one_folder():
    """run_knockoff ... and main.py read one cache: the same victim's queries are not bought twice."""
    import inspect

    import yaml

    from edm_lightning.attacks import ATTACKS, AttackDataModule
    from edm_lightning.attacks.registry import CACHE_DIR

    for config in CONFIGS:
        assert yaml.safe_load(config.read_text())["data"]["init_args"]["cache_dir"] == CACHE_DIR, config
    for name in ATTACKS.names():
        assert ATTACKS.get(name).default("cache_dir") == CACHE_DIR, name
    classes, seen = [AttackDataModule], []
    while classes:
        cls = classes.pop()
        seen.append(cls)
        classes.extend(cls.__subclasses__())
        assert inspect.signature(cls).parameters["cache_dir"].default == CACHE_DIR, cls.__name__
    assert len(seen) > 3
