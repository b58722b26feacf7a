"""The router key is a secret: it comes from the environment or a key file, and no entry point writes it down."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from edm_lightning import routing
from edm_lightning.cli import main
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import run_experiment
from edm_lightning.experiment.__main__ import main as experiment_main
from edm_lightning.experiment.plan import build_plan
from edm_lightning.models import ClassifierModule, EnsembleModule
from edm_lightning.routing import KeyedHashRouter, PublicRouterKeyWarning, key_fingerprint, resolve_router_key
from tests.helpers.experiment import tiny_config
from tests.helpers.files import QUICK, REPO_ROOT, localise_config, save_checkpoint

SECRET = "k3y-that-must-never-leak-7f1c"


def files_holding(root: Path, text: str) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv(routing.ROUTER_KEY_ENV, raising=False)
    monkeypatch.delenv(routing.ROUTER_KEY_FILE_ENV, raising=False)


def test_the_key_comes_from_the_argument_the_environment_or_a_key_file(monkeypatch, tmp_path, no_key_env):
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = KeyedHashRouter(5, SECRET)(x)
    monkeypatch.setenv(routing.ROUTER_KEY_ENV, SECRET)
    assert torch.equal(KeyedHashRouter(5)(x), expected)
    monkeypatch.delenv(routing.ROUTER_KEY_ENV)
    key_file = tmp_path / "router.key"
    key_file.write_text(SECRET + "\n")
    monkeypatch.setenv(routing.ROUTER_KEY_FILE_ENV, str(key_file))
    assert torch.equal(KeyedHashRouter(5)(x), expected)
    assert not torch.equal(KeyedHashRouter(5, "another key")(x), expected)
    monkeypatch.setenv(routing.ROUTER_KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="cannot read the router key file"):
        KeyedHashRouter(5)


def test_the_public_default_key_warns_loudly(monkeypatch, no_key_env):
    monkeypatch.setattr(routing.keys, "_warned_public_key", False)
    with pytest.warns(PublicRouterKeyWarning, match="public default key.*EDM_ROUTER_KEY"):
        KeyedHashRouter(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KeyedHashRouter(3, SECRET)  # a real key: no warning


def test_experiments_may_set_the_public_key_explicitly_and_are_warned_the_same(monkeypatch, no_key_env):
    monkeypatch.setattr(routing.keys, "_warned_public_key", False)
    monkeypatch.setenv(routing.ROUTER_KEY_ENV, "edm-lightning")
    with pytest.warns(PublicRouterKeyWarning, match="public default key"):
        router = KeyedHashRouter(3)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(router(x), KeyedHashRouter(3, routing.DEFAULT_ROUTER_KEY)(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KeyedHashRouter(3, "short key")  # experiments keep any key; only a server needs a secret one


def test_a_served_key_must_be_one_nobody_else_can_compute(monkeypatch, tmp_path, no_key_env):
    with pytest.raises(ConfigError, match="no router key is set"):
        resolve_router_key(None, require_secret=True)
    for key in ("edm-lightning", "EDM-Lightning", " edm-lightning\n", b"edm-lightning"):
        with pytest.raises(ConfigError, match="is the public default 'edm-lightning'.*token_hex"):
            resolve_router_key(key, require_secret=True)
    for key in ("short-key", "x" * 15, "ab" * 20, "0" * 64):
        with pytest.raises(ConfigError, match="too short or too plain to be secret.*at least 16 bytes"):
            resolve_router_key(key, require_secret=True)
    monkeypatch.setenv(routing.ROUTER_KEY_ENV, "edm-lightning")
    with pytest.raises(ConfigError, match="from \\$EDM_ROUTER_KEY is the public default"):
        resolve_router_key(None, require_secret=True)
    monkeypatch.delenv(routing.ROUTER_KEY_ENV)
    (tmp_path / "router.key").write_text("edm-lightning\n")
    monkeypatch.setenv(routing.ROUTER_KEY_FILE_ENV, str(tmp_path / "router.key"))
    with pytest.raises(ConfigError, match="from the key file .* is the public default"):
        resolve_router_key(None, require_secret=True)
    assert resolve_router_key(SECRET, require_secret=True) == SECRET.encode()


def test_the_mask_of_a_saved_config_is_refused_not_used_as_a_key():
    with pytest.raises(ConfigError, match="mask a saved config shows"):
        resolve_router_key("**********")


def test_reprs_show_a_fingerprint_never_the_key():
    router = KeyedHashRouter(3, SECRET)
    assert SECRET not in repr(router) and key_fingerprint(SECRET) in repr(router)
    assert SECRET not in repr(VictimConfig("victim.ckpt", router="keyed", key=SECRET))
    assert SECRET not in repr(EnsembleModule(num_members=2, router_key=SECRET).router_key)
    assert key_fingerprint(SECRET) == key_fingerprint(SECRET) != key_fingerprint("another key")


def test_a_cli_job_writes_the_key_to_no_file_and_no_logger(monkeypatch, fake_root, tmp_path, no_key_env,
                                                         fresh_wandb_session):
    """The key in the user's private config file: config.yaml and the offline W&B run hold only the mask."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    private = tmp_path / "private" / "key.yaml"
    private.parent.mkdir()
    private.write_text(yaml.safe_dump({"model": {"init_args": {"router_key": SECRET}}}))
    cli = main(["fit", "--config", str(config), "--config", str(private), "--config",
                str(REPO_ROOT / "configs/logger/wandb.yaml"), "--data.init_args.val_size", "40",
                "--data.init_args.batch_size", "16", *QUICK])
    assert cli.trainer.state.finished
    runs = tmp_path / "runs"
    assert list(runs.rglob("offline-run-*")) and list(runs.rglob("config.yaml"))
    assert files_holding(runs, SECRET) == []
    assert "router_key: '**********'" in (runs / "edm/config.yaml").read_text()


def test_a_key_on_the_command_line_is_refused(fake_root, tmp_path, capsys):
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), f"--model.init_args.router_key={SECRET}", *QUICK])
    assert exit_info.value.code == 2
    assert "on the command line" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_saved_config_does_not_replay_the_mask_as_a_key(fake_root, tmp_path, capsys, no_key_env):
    """Re-running a job from its config.yaml: the masked key is refused with what to do, not silently used."""
    config = localise_config("configs/edm.yaml", tmp_path, fake_root)
    saved = yaml.safe_load(config.read_text())
    saved["model"]["init_args"]["router_key"] = "**********"
    config.write_text(yaml.safe_dump(saved))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config), *QUICK[:2]])
    assert exit_info.value.code == 2
    assert "Refusing to parse the mask" in capsys.readouterr().err  # jsonargparse's SecretStr refuses it first


def test_a_failing_attack_job_prints_no_key(tmp_path, capsys, no_key_env):
    """Building the victim fails (its hash network is missing): the message shows no key."""
    checkpoint = save_checkpoint(EnsembleModule(num_members=2), tmp_path / "edm.ckpt")
    private = tmp_path / "key.yaml"
    private.write_text(yaml.safe_dump({"data": {"init_args": {"victim": {
        "checkpoint": str(checkpoint), "router": "neural", "hash_checkpoint": str(tmp_path / "missing.ckpt"),
        "key": SECRET}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/attack/knockoff.yaml", "--config", str(private),
              f"--data.init_args.cache_dir={tmp_path}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "missing.ckpt" in captured.err and SECRET not in captured.err + captured.out


def test_the_runner_writes_the_key_nowhere_and_its_stages_depend_on_it(monkeypatch, fake_root, tmp_path):
    monkeypatch.setenv(routing.ROUTER_KEY_ENV, SECRET)
    config = tiny_config(fake_root, tmp_path)
    run_experiment(config)
    assert files_holding(tmp_path, SECRET) == []
    edm_config = next((tmp_path / "runs/tiny").glob("edm-*/config.json")).read_text()
    assert key_fingerprint(SECRET) in edm_config
    keyed = {stage.id for stage in build_plan(config).stages}
    monkeypatch.setenv(routing.ROUTER_KEY_ENV, "another key")
    other = {stage.id for stage in build_plan(config).stages}
    assert keyed != other  # a stage behind the keyed router is not reused under another key
    with pytest.raises(SystemExit) as exit_info:
        experiment_main(["--config", str(REPO_ROOT / "configs/experiment/fashionmnist.yaml"),
                         f"--edm.router_key={SECRET}", "--dry_run=true"])
    assert exit_info.value.code == 2


def test_a_plain_classifier_victim_needs_no_key(tmp_path, no_key_env):
    checkpoint = save_checkpoint(ClassifierModule(), tmp_path / "target.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PublicRouterKeyWarning)
        VictimConfig(str(checkpoint)).build()
