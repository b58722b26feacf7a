"""DFME on a tiny synthetic victim: the zeroth-order gradient points the right way; queries add up exactly."""

import pytest
import torch

from edm_lightning.attacks import BlackBoxOracle, run_dfme
from edm_lightning.attacks.dfme import Generator, to_images, victim_logits, zeroth_order_gradient
from edm_lightning.nets import build_net
from tests.helpers.victims import EVAL_SIZE, linear_victim


def test_zeroth_order_estimate_follows_the_true_gradient_and_costs_m_plus_one_per_input():
    torch.manual_seed(0)
    victim = linear_victim()
    clone = build_net("lenet5", (1, 28, 28), 10)
    pre = torch.randn(4, 1, 28, 28) * 0.5
    oracle = BlackBoxOracle(victim, budget=None)
    estimate, _ = zeroth_order_gradient(oracle, clone, pre, directions=400, epsilon=1e-3)
    assert oracle.queries_spent == 4 * 401
    exact_pre = pre.clone().requires_grad_(True)  # the harness may differentiate the victim; the attack may not
    x = to_images(exact_pre)
    with torch.no_grad():
        target = victim_logits(victim(x))
    loss = -(clone(x) - target).abs().mean(dim=-1).mean()
    (exact,) = torch.autograd.grad(loss, exact_pre)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(1), exact.flatten(1)).mean()
    assert cosine > 0.3, cosine  # random directions: about sqrt(m / d) = 0.7 for a smooth loss


def test_generator_makes_valid_queries():
    images = to_images(Generator(16, (1, 28, 28))(torch.randn(5, 16)))
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_runs_until_the_budget_and_reports_exactly_what_it_spent(victim, fake_data, tmp_path):
    # one iteration: 16 x ((1 + 1) x 1 generator step + 2 clone steps) = 64 queries; 300 pays for 4
    results = run_dfme(victim, budget=300, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2,
                       latent_dim=16, cache_dir=str(tmp_path), root=str(tmp_path))
    assert results["queries"] == 4 * 64 == victim.rows - EVAL_SIZE
    assert 0 <= results["clone_acc"] <= 1 and 0 <= results["agreement"] <= 1


def test_budget_below_one_iteration_fails_before_any_query(victim, fake_data, tmp_path):
    with pytest.raises(ValueError, match="one DFME iteration costs"):
        run_dfme(victim, budget=40, batch_size=16, cache_dir=str(tmp_path), root=str(tmp_path))
    assert victim.rows == EVAL_SIZE  # only the evaluation labels, computed at setup


def test_a_dfme_stage_killed_in_the_runner_is_charged_on_its_rerun(fake_root, tmp_path, checkpoint_factory, monkeypatch):
    """The issue's example: DFME killed in its attack stage and run again by the runner answered 13,312 queries for a
    budget of 8,000. The stage (the runner's own stage function, through LightningCLI) keeps a ledger of what it spent
    beside its cache, so the re-run spends only the rest."""
    from edm_lightning.attacks import oracle
    from edm_lightning.experiment import AttackConfig
    from edm_lightning.experiment.jobs import attack
    from edm_lightning.models import ClassifierModule
    from tests.helpers.experiment import tiny_config

    answered, sealed = {"rows": 0, "calls": 0, "kill_at": 3}, oracle._sealed

    def counted(victim):  # every row the victim answers through an oracle
        answer = sealed(victim)

        def wrapped(x):
            answers = answer(x)
            answered["rows"] += len(x)
            answered["calls"] += 1
            if answered["calls"] == answered["kill_at"]:
                raise KeyboardInterrupt("killed after the victim answered")
            return answers

        return wrapped

    monkeypatch.setattr(oracle, "_sealed", counted)
    budget, folder = 300, tmp_path / "runs" / "attack-dfme"
    settings = AttackConfig(name="dfme", budgets=[budget], epochs=10,
                            options=dict(batch_size=16, steps_per_epoch=3, clone_steps=2, latent_dim=16))
    victim = {"checkpoint": checkpoint_factory(ClassifierModule()), "router": "fixed"}
    config = tiny_config(fake_root, tmp_path)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        attack(config, folder, settings, victim, budget, seed=0)
    killed = answered["rows"]
    answered["kill_at"] = None
    figures = attack(config, folder, settings, victim, budget, seed=0)
    assert 0 < killed and answered["rows"] <= figures["queries"] <= budget  # 13,312 for 8,000 before
    assert figures["queries"] - figures["queries_this_run"] >= killed  # the re-run was charged the killed run's queries
