"""Every registered attack, router, post-processor and architecture runs through ``main.py`` on tiny data.

Parametrised from the registries, so an entry is tested the day it is registered: a new attack needs only
its tiny settings (``tests/helpers/attacks.py``), a new post-processor its tiny arguments below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from edm_lightning.attacks import ATTACKS
from edm_lightning.cli import main
from edm_lightning.defense import POSTPROCESSORS, VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.export.graph import ExportableVictim
from edm_lightning.models import ClassifierModule, EnsembleModule, MisinformationModule
from edm_lightning.nets import ARCHITECTURES, build_net
from edm_lightning.routing import ROUTERS, router_class
from tests.helpers.attacks import tiny_settings

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def checkpoints(fake_root: Path, checkpoint_factory) -> dict[str, str]:
    torch.manual_seed(0)
    return {"target": checkpoint_factory(ClassifierModule("lenet5"), "target.ckpt"),
            "ensemble": checkpoint_factory(EnsembleModule("lenet5", num_members=3), "ensemble.ckpt"),
            "hash": checkpoint_factory(ClassifierModule("small_cnn"), "hash.ckpt"),
            "misinformation": checkpoint_factory(MisinformationModule("lenet5"), "misinformation.ckpt")}


def served(fake_root: Path, tmp_path: Path, victim: dict):
    """``main.py test`` of the victim as served (:class:`~edm_lightning.defense.ServedVictimModule`) on 40 test images."""
    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"inference_mode": False},  # Prediction Poisoning differentiates a proxy for each answer
        "model": {"class_path": "edm_lightning.defense.ServedVictimModule", "init_args": {"victim": victim}},
        "data": {"class_path": "edm_lightning.data.ClassificationDataModule",
                 "init_args": {"dataset": "fashionmnist", "root": str(fake_root), "batch_size": 16, "test_size": 40}}}))
    return main(["test", "--config", str(config), *QUIET])


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_runs_through_main_fit(name, fake_root: Path, checkpoints, tmp_path: Path):
    settings = tiny_settings(name)
    job = ATTACKS.get(name).build(VictimConfig(checkpoints["target"]), dataset="fashionmnist", root=str(fake_root),
                                  cache_dir=str(tmp_path / "cache"), test_size=40, seed=0, **settings)
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump(job.cli_config()))
    cli = main(["fit", "--config", str(config), *QUIET, "--trainer.enable_checkpointing=false",
                f"--trainer.default_root_dir={tmp_path}"])
    assert 0 < cli.datamodule.queries_spent <= settings["budget"]
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["test/agreement"] <= 1


@pytest.mark.parametrize("name", ROUTERS.names())
def test_every_registered_router_serves_through_main_test(name, fake_root: Path, checkpoints, tmp_path: Path):
    kind = router_class(name)
    victim = {"checkpoint": checkpoints["ensemble"], "router": name}
    if kind.needs_hash_network:
        victim["hash_checkpoint"] = checkpoints["hash"]
    cli = served(fake_root, tmp_path, victim)
    assert 0 <= cli.model.tested_accuracy <= 1 and isinstance(cli.model.victim.router, kind)
    x = torch.rand(64, 1, 28, 28)
    routes = cli.model.victim.router(x)
    assert routes.shape == (64,) and 0 <= int(routes.min()) and int(routes.max()) < 3
    if kind.exportable:  # the exported graph routes as the eager router does
        assert torch.equal(ExportableVictim(cli.model.victim).route(x), routes)


def test_a_routers_own_options_set_in_a_config_reach_the_router(fake_root: Path, checkpoints, tmp_path: Path):
    router = {"class_path": "coarse", "init_args": {"grid": 2, "levels": 3}}
    cli = served(fake_root, tmp_path, {"checkpoint": checkpoints["ensemble"], "router": router})
    assert (cli.model.victim.router.grid, cli.model.victim.router.levels) == (2, 3)
    assert cli.model.victim.router.view(torch.rand(5, 1, 28, 28)).shape == (5, 4)  # a 2 x 2 view
    with pytest.raises(ConfigError, match=r"takes no init_args \['gird'\]; it takes: grid, levels"):
        VictimConfig(checkpoints["ensemble"], router={"class_path": "coarse", "init_args": {"gird": 2}})


#: Tiny init arguments of each registered post-processor (``misinformation``: the fixture's checkpoint).
POSTPROCESSOR_ARGS = {
    "AdaptiveMisinformation": {"tau": 0.5, "nu": 100.0, "misinformation_model": "misinformation"},
    "PredictionPoisoning": {"epsilon": 0.5},
    "ReverseSigmoid": {"beta": 0.3},
    "Rounding": {"decimals": 1},
    "TopLabel": {},
}


@pytest.mark.parametrize("name", POSTPROCESSORS.names())
def test_every_registered_postprocessor_serves_through_main_test(name, fake_root: Path, checkpoints, tmp_path: Path):
    assert name in POSTPROCESSOR_ARGS, f"post-processor {name!r} is registered but has no tiny arguments in this test"
    init_args = {k: checkpoints.get(v, v) if isinstance(v, str) else v for k, v in POSTPROCESSOR_ARGS[name].items()}
    cli = served(fake_root, tmp_path, {"checkpoint": checkpoints["target"],
                                       "postprocessors": [{"class_path": name, "init_args": init_args}]})
    assert [type(p).__name__ for p in cli.model.victim.postprocessors] == [name]
    answers = cli.model.victim(torch.rand(8, 1, 28, 28))
    assert answers.shape == (8, 10) and torch.isfinite(answers).all()
    torch.testing.assert_close(answers.sum(dim=-1), torch.ones(8))


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_every_registered_architecture_trains_through_main_fit_or_refuses_the_shape(name, fake_root: Path,
                                                                                 tmp_path: Path):
    try:
        build_net(name, (1, 28, 28), 10)
    except ConfigError as err:  # refused when built, before any training: and it must work where it says it does
        assert "28x28" in str(err)
        net = build_net(name, (3, 32, 32), 10)
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        return
    cli = main(["fit", "--model", "ClassifierModule", f"--model.arch={name}", "--data", "ClassificationDataModule",
                f"--data.root={fake_root}", "--data.train_size=32", "--data.val_size=16", "--data.batch_size=16",
                "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_a_routers_own_options_on_the_command_line_reach_the_ensemble(fake_root: Path, tmp_path: Path):
    cli = main(["--config", "configs/edm.yaml", f"--data.init_args.root={fake_root}",
                "--model.router", "{class_path: coarse, init_args: {grid: 5, levels: 3}}"], run=False)
    assert cli.model.router_kind == {"class_path": "coarse", "init_args": {"grid": 5, "levels": 3}}
    with pytest.raises(SystemExit) as refused:  # a misspelt setting fails while the command line is parsed
        main(["--config", "configs/edm.yaml", f"--data.init_args.root={fake_root}",
              "--model.router", "{class_path: coarse, init_args: {levles: 3}}"], run=False)
    assert refused.value.code == 2


def test_an_experiments_router_settings_name_its_rows_and_a_misspelt_one_stops_the_parse(fake_root: Path, tmp_path: Path,
                                                                                         capsys):
    from edm_lightning.experiment.__main__ import main as experiment_main
    from edm_lightning.experiment.plan import build_plan
    from tests.helpers.experiment import tiny_config

    config = tiny_config(fake_root, tmp_path)
    config.edm.routers = ["neural", {"class_path": "coarse", "init_args": {"grid": 2, "levels": 3}}]
    config.edm.__post_init__()
    plan = build_plan(config)
    assert {defense for defense, *_ in plan.victims} >= {"none", "edm-neural", "edm-coarse(grid=2,levels=3)"}
    served = next(s for s in plan.stages if s.kind == "served" and s.key["router"] != "neural")
    assert served.key["router"] == {"class_path": "coarse", "init_args": {"grid": 2, "levels": 3}}
    with pytest.raises(SystemExit) as refused:
        experiment_main(["--config", "configs/experiment/fashionmnist.yaml", "--dry_run", "true",
                         "--edm.routers", "[neural, {class_path: coarse, init_args: {gird: 5}}]"])
    assert refused.value.code == 2 and "router 'coarse' (CoarseKeyedHashRouter) takes no init_args ['gird']" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name", [name for name, entry in ATTACKS.items() if entry.queries_in_training])
def test_every_attack_that_queries_in_its_training_loop_refuses_ddp(name, fake_root: Path, checkpoints, tmp_path: Path):
    from types import SimpleNamespace

    job = ATTACKS.get(name).build(VictimConfig(checkpoints["target"]), dataset="fashionmnist", root=str(fake_root),
                                  cache_dir=str(tmp_path / "cache"), seed=0, **tiny_settings(name))
    datamodule, module = job.build()
    module._trainer = datamodule.trainer = SimpleNamespace(world_size=2, datamodule=datamodule)  # as under DDP
    try:  # the data side runs first (setup before on_fit_start): it refuses, or buys nothing
        datamodule.setup("fit")
    except ConfigError as err:
        assert "queries the victim inside its training loop" in str(err)
    assert datamodule.queries_spent == 0
    with pytest.raises(ConfigError, match="queries the victim inside its training loop"):
        module.on_fit_start()
    assert datamodule.queries_spent == 0


def test_an_attack_against_a_router_with_its_own_settings_runs_and_caches_apart(fake_root: Path, checkpoints,
                                                                               tmp_path: Path):
    settings = dict(dataset="fashionmnist", root=str(fake_root), cache_dir=str(tmp_path / "cache"), test_size=40, seed=0,
                    **tiny_settings("knockoff"))
    coarse = {"class_path": "coarse", "init_args": {"grid": 2, "levels": 3}}
    figures = [ATTACKS.get("knockoff").build(VictimConfig(checkpoints["ensemble"], router=router), **settings).run(
        {"accelerator": "cpu"}) for router in (coarse, "coarse")]
    assert [f["queries_this_run"] for f in figures] == [settings["budget"]] * 2  # another router: another transfer set
    assert len(list((tmp_path / "cache").glob("knockoff-*.pt"))) == 2
