"""MAZE on a tiny synthetic victim: the KL gradient points the right way; replay is free; queries add up exactly."""

import pytest
import torch

from edm_lightning.attacks import BlackBoxOracle, run_maze
from edm_lightning.attacks.dfme import to_images, zeroth_order_gradient
from edm_lightning.attacks.maze import MAZEModule, kl_disagreement
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net
from tests.helpers.victims import EVAL_SIZE, linear_victim


def test_kl_disagreement_is_zero_for_the_victims_own_answers_and_its_gradient_estimate_follows_the_true_one():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert kl_disagreement(probs.log(), probs).abs().item() < 1e-6
    assert kl_disagreement(torch.zeros(1, 3), probs).item() > 0
    torch.manual_seed(0)
    victim, clone = linear_victim(), build_net("lenet5", (1, 28, 28), 10)
    pre = torch.randn(4, 1, 28, 28) * 0.5
    oracle = BlackBoxOracle(victim, budget=None)
    estimate, _ = zeroth_order_gradient(oracle, clone, pre, directions=400, epsilon=1e-3, disagreement=kl_disagreement)
    assert oracle.queries_spent == 4 * 401
    exact_pre = pre.clone().requires_grad_(True)
    x = to_images(exact_pre)
    with torch.no_grad():
        answers = victim(x)
    (exact,) = torch.autograd.grad(-kl_disagreement(clone(x), answers).mean(), exact_pre)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(1), exact.flatten(1)).mean()
    assert cosine > 0.3, cosine


def test_runs_until_the_budget_and_reports_exactly_what_it_spent_replay_included(victim, fake_data, tmp_path):
    # one iteration: 16 x ((2 + 1) x 1 generator step + 2 clone steps) = 80 queries; 400 pays for 5; replay is free
    results = run_maze(victim, budget=400, batch_size=16, steps_per_epoch=3, max_epochs=10, clone_steps=2, directions=2,
                       replay_steps=3, latent_dim=16, cache_dir=str(tmp_path), root=str(tmp_path))
    assert results["queries"] == 5 * 80 == victim.rows - EVAL_SIZE
    assert results["attack"] == "maze" and 0 <= results["clone_acc"] <= 1


def test_replay_keeps_the_latest_answers_up_to_its_size():
    module = MAZEModule(replay_size=5)
    for start in (0, 3, 6):
        module._replay.add(torch.full((3, 1, 28, 28), float(start)), torch.full((3, 10), float(start)))
    assert len(module._replay) == 5
    assert sorted(module._replay._x[:, 0, 0, 0].tolist()) == [3.0, 3.0, 6.0, 6.0, 6.0]  # the oldest replaced first
    x, answers = module._replay.sample(50, replace=True)  # MAZE draws with replacement: more rows than are kept
    assert len(x) == 50 and set(x[:, 0, 0, 0].tolist()) == {3.0, 6.0} and torch.equal(x[:, 0, 0, 0], answers[:, 0])
    with pytest.raises(ConfigError, match="replay_steps must be >= 0"):
        MAZEModule(replay_steps=-1)
