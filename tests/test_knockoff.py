"""KnockoffNets on a tiny synthetic victim: it steals, it pays once, it resumes within budget."""

import pytest
import torch

from edm_lightning.attacks import BlackBoxOracle, KnockoffDataModule, build_transfer_set, run_knockoff
from edm_lightning.attacks.knockoff import TransferSet
from edm_lightning.defense import VictimConfig
from tests.synthetic_victims import EVAL_SIZE, CountingVictim, linear_victim, untrained_agreement


def knockoff(victim, tmp_path, **overrides):
    options = dict(budget=512, max_epochs=6, batch_size=64, cache_dir=str(tmp_path / "cache"), root=str(tmp_path))
    options.update(overrides)
    return run_knockoff(victim, **options)


@pytest.mark.parametrize("strategy", ["random", "adaptive"])
def test_clone_agrees_with_victim_far_more_than_untrained(victim, fake_data, tmp_path, strategy):
    results = knockoff(victim, tmp_path, strategy=strategy)
    floor = untrained_agreement(KnockoffDataModule(linear_victim(), root=str(tmp_path), budget=512))
    assert results["queries"] == results["queries_this_run"] == 512
    assert victim.rows == 512 + EVAL_SIZE  # the queries, and the victim's labels of its test set (evaluation)
    assert results["agreement"] > floor + 0.4, (results, floor)


def test_second_run_spends_nothing_and_smaller_budget_reuses_prefix(victim, fake_data, tmp_path):
    first = knockoff(victim, tmp_path, max_epochs=1)
    again = knockoff(victim, tmp_path, max_epochs=1)
    smaller = knockoff(victim, tmp_path, max_epochs=1, budget=128)
    assert victim.rows == 512 + 3 * EVAL_SIZE  # three runs, each measuring on the victim's test set
    assert (again["queries"], again["queries_this_run"]) == (512, 0)
    assert (smaller["queries"], smaller["queries_this_run"]) == (128, 0)
    bigger = knockoff(victim, tmp_path, max_epochs=1, budget=640)
    assert bigger["queries_this_run"] == 128 and victim.rows == 640 + 4 * EVAL_SIZE  # only the difference is bought
    assert first["transfer_set"] == 512


@pytest.mark.parametrize("strategy", ["random", "adaptive"])
def test_killed_run_resumes_without_exceeding_budget(fake_data, tmp_path, strategy):
    from edm_lightning.nets import build_net

    images = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(500) % 10
    path = tmp_path / "transfer.pt"

    def attempt(victim):
        torch.manual_seed(0)
        policy = build_net("lenet5", (1, 28, 28), 10) if strategy == "adaptive" else None
        return build_transfer_set(lambda spent: BlackBoxOracle(victim, 300, spent=spent), images, labels, 300, path,
                                  strategy=strategy, batch_size=64, policy=policy)

    killed = CountingVictim(linear_victim(), fail_after_calls=3)
    with pytest.raises(KeyboardInterrupt):
        attempt(killed)
    assert len(TransferSet.load(path)) == 3 * 64  # every answered batch was kept
    resumed = CountingVictim(linear_victim())
    result = attempt(resumed)
    assert killed.rows + resumed.rows == 300  # the victim answered exactly the budget, over both runs
    assert len(result) == 300
    if strategy == "random":
        assert len(set(result.indices.tolist())) == 300  # no image bought twice  # the resumed set is the one an uninterrupted run buys
        fresh = tmp_path / "fresh.pt"
        uninterrupted = build_transfer_set(
            lambda spent: BlackBoxOracle(linear_victim(), 300, spent=spent), images, labels, 300, fresh, batch_size=64)
        assert torch.equal(uninterrupted.indices, result.indices)
        torch.testing.assert_close(uninterrupted.answers, result.answers)


def test_bad_input_fails_before_any_query(victim, fake_data, tmp_path):
    with pytest.raises(ValueError, match="smaller than one query batch"):
        knockoff(victim, tmp_path, budget=32)
    with pytest.raises(ValueError, match="strategy"):
        knockoff(victim, tmp_path, strategy="greedy")
    with pytest.raises(Exception, match="cifar"):
        knockoff(victim, tmp_path, surrogate="cifar-11")
    with pytest.raises(ValueError, match="victim takes inputs"):
        knockoff(victim, tmp_path, dataset="cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        knockoff(VictimConfig(str(tmp_path / "missing.ckpt")), tmp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"lr": 1.0}}, foreign)
    with pytest.raises(ValueError, match="not a target or EDM ensemble checkpoint"):
        knockoff(VictimConfig(str(foreign)), tmp_path)
    assert victim.rows == 0
