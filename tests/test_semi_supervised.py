"""KnockoffNets with a FixMatch clone on tiny data: the unbought pool as unlabelled data, the masked consistency loss,
the purchase shared with plain KnockoffNets, DDP slices, bad settings refused, a run through ``main.py fit``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from edm_lightning.attacks import ATTACKS
from edm_lightning.attacks.semi_supervised import SemiSupervisedDataModule, check_knockoff_fixmatch
from edm_lightning.cli import main
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import run_experiment
from edm_lightning.experiment.config import AttackConfig
from edm_lightning.models import SemiSupervisedCloneModule
from edm_lightning.models.clone import clone_loss
from edm_lightning.models.semi_supervised_clone import augment_each, build_augment, consistency_loss
from tests.helpers.experiment import tiny_config
from tests.helpers.files import QUICK, localise_config, save_victim
from tests.helpers.victims import EVAL_SIZE, CountingVictim, linear_victim

POOL = 800  # the fake MNIST training split (`fake_data`)


def datamodule(tmp_path: Path, **settings) -> SemiSupervisedDataModule:
    settings = {**dict(root=str(tmp_path), budget=200, batch_size=32, query_batch_size=64, mu=2,
                       cache_dir=str(tmp_path / "cache")), **settings}
    module = SemiSupervisedDataModule(CountingVictim(linear_victim()), **settings)
    module.prepare_data()
    module.setup("fit")
    return module


@pytest.mark.parametrize("strategy", ["random", "adaptive"])
def test_the_unlabelled_images_are_exactly_the_pool_images_not_bought(strategy, fake_data, tmp_path: Path):
    data = datamodule(tmp_path, strategy=strategy)
    bought, unlabelled = set(data.transfer.indices.tolist()), data.unlabelled.tolist()
    assert len(data.transfer) == 200 and len(unlabelled) == len(set(unlabelled))
    assert not bought & set(unlabelled)  # no bought image among them
    assert bought | set(unlabelled) == set(range(POOL))  # and none missing
    # what the loader serves over an epoch: pool images that were not bought, never one that was
    pool, _ = data._surrogate_images()
    served = {bytes(image.mul(255).round().to(torch.uint8).numpy()) for batch, _, _ in data.train_dataloader()
              for image in batch["unlabelled"]}
    assert served <= {bytes(pool[i].numpy()) for i in unlabelled}
    assert not served & {bytes(pool[i].numpy()) for i in bought}


def test_an_epoch_is_one_pass_over_the_bought_images_with_mu_unlabelled_per_bought_one(fake_data, tmp_path: Path):
    data = datamodule(tmp_path, budget=750)  # 50 images left: the unlabelled loader cycles them, each equally often
    loader = data.train_dataloader()
    batches = [batch for batch, _, _ in loader]  # a CombinedLoader yields (batch, index, loader index)
    assert len(batches) == math.ceil(750 / 32) == len(loader)
    assert sum(len(b["labelled"][0]) for b in batches) == 750
    assert all(len(b["unlabelled"]) == 64 for b in batches)
    assert len(loader.flattened[1].dataset) % 50 == 0 and len(loader.flattened[1].dataset) >= 64 * len(batches)


def test_under_ddp_each_process_trains_on_its_own_slice_of_both_sets(fake_data, tmp_path: Path):
    """Lightning gives each loader of the combined loader a DistributedSampler: the processes' labelled slices are
    disjoint, and the unlabelled loader never ends a process's epoch before its labelled pass does."""
    data = datamodule(tmp_path, budget=210)
    seen = []
    for rank in (0, 1):
        loader = data.train_dataloader()
        loader.flattened = [_update_dataloader(dl, DistributedSampler(dl.dataset, num_replicas=2, rank=rank, seed=0))
                            for dl in loader.flattened]
        batches = [batch for batch, _, _ in loader]
        assert len(batches) == math.ceil(105 / 32) and all(len(b["unlabelled"]) == 64 for b in batches)
        seen.append({bytes(x.numpy()) for b in batches for x in b["labelled"][0]})
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == 210


def test_a_budget_that_buys_the_whole_pool_trains_on_the_answers_alone_with_a_warning(fake_data, tmp_path: Path):
    data = datamodule(tmp_path, budget=POOL)
    assert len(data.unlabelled) == 0
    with pytest.warns(UserWarning, match="nothing is left unlabelled"):
        loader = data.train_dataloader()
    x, answers = next(iter(loader))
    assert x.shape == (32, 1, 28, 28) and answers.shape == (32, 10)


def test_the_consistency_loss_is_zero_when_no_row_reaches_tau_and_positive_otherwise():
    torch.manual_seed(0)
    weak, strong = torch.randn(64, 10), torch.randn(64, 10, requires_grad=True)
    confidence = weak.softmax(dim=-1).max(dim=-1).values
    loss, share = consistency_loss(weak, strong, tau=float(confidence.max()) + 1e-3)  # above every confidence
    assert loss.item() == 0 and share.item() == 0
    loss.backward()
    assert not strong.grad.any()  # an empty mask teaches nothing
    tau = float(confidence.median())
    loss, share = consistency_loss(weak.requires_grad_(), strong, tau=tau)
    assert loss.item() > 0 and share.item() == pytest.approx(float((confidence >= tau).float().mean()))
    loss.backward()
    assert weak.grad is None  # the pseudo-label is a target: no gradient flows into the weak view
    kept = confidence >= tau
    expected = torch.nn.functional.cross_entropy(strong[kept], weak[kept].argmax(dim=-1), reduction="sum") / 64
    torch.testing.assert_close(loss, expected)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training step outside a Trainer
def test_with_an_empty_mask_the_clone_trains_on_the_bought_answers_alone():
    torch.manual_seed(0)
    module = SemiSupervisedCloneModule(tau=1.0, labelled_augment="none")  # a fresh clone is never that sure
    x, answers, u = torch.rand(8, 1, 28, 28), torch.softmax(torch.randn(8, 10), dim=-1), torch.rand(24, 1, 28, 28)
    loss = module.training_step({"labelled": (x, answers), "unlabelled": u}, 0)
    torch.testing.assert_close(loss, clone_loss(module(x), answers))
    assert module._kept.tolist() == [0.0, 24.0]
    module.hparams.tau = 1e-3  # every row kept: the unlabelled term adds to the loss
    assert module.training_step({"labelled": (x, answers), "unlabelled": u}, 0) > clone_loss(module(x), answers)


def test_each_image_gets_its_own_augmentation_and_stays_in_range():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 28, 28).expand(16, 1, 28, 28)
    for name in ("shift", "randaugment", "affine"):
        views = augment_each(build_augment(name, (1, 28, 28)), x)
        assert views.shape == x.shape and 0 <= float(views.min()) and float(views.max()) <= 1
        assert len({bytes(v.numpy()) for v in views}) > 1, name  # not one draw for the whole batch
    assert augment_each(build_augment("none", (1, 28, 28)), x) is x


@pytest.mark.parametrize("options, message", [
    ({"tau": 0.0}, r"tau must be a confidence threshold in \(0, 1\]"),
    ({"tau": 1.5}, r"tau must be a confidence threshold in \(0, 1\]"),
    ({"tau": float("nan")}, r"tau must be a confidence threshold in \(0, 1\]"),
    ({"lambda_u": -1.0}, "lambda_u must be a finite weight >= 0"),
    ({"lambda_u": float("inf")}, "lambda_u must be a finite weight >= 0"),
    ({"lambda_u": float("nan")}, "lambda_u must be a finite weight >= 0"),
    ({"mu": 0}, "mu must be a whole number >= 1"),
    ({"mu": 1.5}, "mu must be a whole number >= 1"),
    ({"strong_augment": "shift"}, "unknown strong_augment 'shift': expected one of randaugment, affine"),
    ({"weak_augment": "flip"}, "unknown weak_augment 'flip': expected one of none, shift, shift_flip"),
    ({"labelled_augment": "randaugment"}, "unknown labelled_augment 'randaugment': expected one of none, shift, shift_flip"),
])
def test_bad_settings_are_refused_by_the_job_the_parts_and_before_a_runners_first_stage(options, message, fake_data,
                                                                                         tmp_path: Path):
    with pytest.raises(ConfigError, match=message):
        check_knockoff_fixmatch(1000, options)
    with pytest.raises(ConfigError, match=message):
        ATTACKS.get("knockoff_fixmatch").build(linear_victim(), root=str(tmp_path), **options)
    with pytest.raises(ConfigError, match=message):
        if "mu" in options:
            SemiSupervisedDataModule(linear_victim(), root=str(tmp_path), **options)
        else:
            SemiSupervisedCloneModule(**options)


def test_a_runner_refuses_a_bad_setting_before_its_first_stage(fake_root: Path, tmp_path: Path):
    attack = AttackConfig(name="knockoff_fixmatch", budgets=[64], options={"batch_size": 32, "tau": 2.0})
    with pytest.raises(ConfigError, match=r"tau must be a confidence threshold in \(0, 1\]"):
        run_experiment(tiny_config(fake_root, tmp_path, attacks=[attack]))
    assert not (tmp_path / "runs").exists()


def test_it_buys_exactly_what_knockoff_buys_and_shares_its_purchase(fake_data, tmp_path: Path):
    common = dict(root=str(tmp_path), cache_dir=str(tmp_path / "cache"), batch_size=32, max_epochs=1)
    first = CountingVictim(linear_victim())
    figures = ATTACKS.get("knockoff_fixmatch").run(first, budget=200, mu=2, **common)
    assert first.rows - EVAL_SIZE == figures["queries"] == figures["queries_this_run"] == 200
    assert figures["transfer_set"] == 200 and figures["unlabelled"] == POOL - 200
    assert figures["attack"] == "knockoff_fixmatch-random" and 0 <= figures["mask_share"] <= 1
    (cache,) = (tmp_path / "cache").glob("knockoff-*.pt")  # KnockoffNets' own transfer-set file
    again = CountingVictim(linear_victim())
    plain = ATTACKS.get("knockoff").run(again, budget=200, **common)
    assert again.rows == EVAL_SIZE  # plain KnockoffNets at the same settings buys nothing: it reads the same set
    assert (plain["queries"], plain["queries_this_run"]) == (200, 0)
    assert sorted(p.name for p in (tmp_path / "cache").glob("knockoff-*.pt")) == [cache.name]


def test_a_tiny_run_through_main_fit(fake_root: Path, tmp_path: Path, capsys):
    local = localise_config("configs/attack/knockoff_fixmatch.yaml", tmp_path, fake_root)
    save_victim(local)
    cli = main(["fit", "--config", str(local), *QUICK, "--trainer.limit_train_batches", "1.0", "--trainer.max_epochs", "2",
                "--trainer.logger", "false", "--data.init_args.budget", "160", "--data.init_args.batch_size", "32",
                "--data.init_args.test_size", "40", "--data.init_args.mu", "2", "--model.init_args.tau", "0.3"])
    data, model = cli.datamodule, cli.model
    assert data.queries_spent == 160 and len(data.unlabelled) == 200 - 160  # the fake MNIST pool holds 200 images
    assert cli.trainer.global_step == 2 * math.ceil(160 / 32)  # an epoch is one pass over the bought images
    assert 0 <= model.mask_share <= 1 and "train/epoch_mask_share" in cli.trainer.callback_metrics
    line = [line for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
    assert line.startswith("fit: clone accuracy") and "160 of 160 queries spent" in line, line
    config = yaml.safe_load((tmp_path / "runs/attack/knockoff_fixmatch/config.yaml").read_text())
    assert config["model"]["init_args"]["tau"] == 0.3 and config["data"]["init_args"]["mu"] == 2


@pytest.mark.parametrize("setting, message", [
    (["--model.init_args.tau", "1.5"], r"tau must be a confidence threshold in (0, 1]"),
    (["--data.init_args.mu", "0"], "mu must be a whole number >= 1"),
])
def test_the_cli_refuses_a_bad_setting_with_one_line_and_status_2(setting, message, fake_root: Path, tmp_path: Path,
                                                                   capsys):
    local = localise_config("configs/attack/knockoff_fixmatch.yaml", tmp_path, fake_root)
    save_victim(local)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(local), "--trainer.logger", "false", *setting])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.rglob("knockoff-*.pt"))  # refused before anything was bought
