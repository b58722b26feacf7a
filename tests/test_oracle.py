"""The oracle: the only door to a victim. Counting, budget, label-only answers, nothing but answers."""

import pytest
import torch
from torch import nn

from edm_lightning.attacks import BlackBoxOracle, QueryBudgetExceeded
from edm_lightning.errors import ConfigError


def batch(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28)


def test_counts_every_row_and_answers_probabilities(victim):
    oracle = BlackBoxOracle(victim, budget=100)
    answers = oracle(batch(7))
    oracle(batch(3))
    assert oracle.queries_spent == 10 == victim.rows
    assert oracle.remaining == 90
    assert answers.shape == (7, 10)
    torch.testing.assert_close(answers.sum(dim=1), torch.ones(7))


def test_refuses_past_budget_without_asking_the_victim(victim):
    oracle = BlackBoxOracle(victim, budget=10)
    oracle(batch(8))
    with pytest.raises(QueryBudgetExceeded, match="8 of 10 queries spent") as info:
        oracle(batch(3))
    assert (info.value.spent, info.value.allowed, info.value.requested) == (8, 10, 3)
    assert victim.rows == 8 and oracle.queries_spent == 8  # the refused batch reached nobody
    oracle(batch(2))  # exactly up to the budget is fine
    assert oracle.remaining == 0


def test_resumed_oracle_charges_earlier_queries(victim):
    oracle = BlackBoxOracle(victim, budget=10, spent=9)
    with pytest.raises(QueryBudgetExceeded):
        oracle(batch(2))
    assert victim.rows == 0
    with pytest.raises(ValueError, match="spent"):
        BlackBoxOracle(victim, budget=10, spent=11)


def test_label_only_answers_one_hot_top1(victim):
    x = batch(6)
    probs = BlackBoxOracle(victim, budget=None)(x)
    labels = BlackBoxOracle(victim, budget=None, label_only=True)(x)
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(labels.sum(dim=1), torch.ones(6))
    assert torch.equal(labels.argmax(dim=1), probs.argmax(dim=1))


def test_invalid_queries_are_refused_and_not_counted(victim):
    oracle = BlackBoxOracle(victim, budget=100)
    for bad in (torch.rand(2, 3, 28, 28), torch.rand(2, 1, 28, 28) * 3, torch.zeros(2, 1, 28, 28, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            oracle(bad)
    assert oracle.queries_spent == 0


def test_exposes_no_weights_logits_or_gradients(victim):
    oracle = BlackBoxOracle(victim, budget=100)
    assert not isinstance(oracle, nn.Module)
    assert not any(isinstance(value, (nn.Module, nn.Parameter)) for value in vars(oracle).values())
    x = batch(4).requires_grad_(True)
    answers = oracle(x)
    assert not answers.requires_grad and answers.grad_fn is None
    answers.add_(1.0)  # a copy: scribbling on it changes nothing for the next caller
    assert torch.all(oracle(x.detach()) <= 1.0)
    assert torch.all(answers >= 0)  # probabilities, not logits


def test_bad_budget_and_victim_are_refused(victim):
    with pytest.raises(ValueError, match="budget"):
        BlackBoxOracle(victim, budget=0)
    with pytest.raises(TypeError, match="input_shape"):
        BlackBoxOracle(nn.Linear(2, 2), budget=10)


@pytest.mark.parametrize("budget", [2.5, True, "100"])
def test_a_budget_must_be_a_whole_number_of_queries(victim, budget):
    with pytest.raises(ConfigError, match="budget must be a positive whole number"):
        BlackBoxOracle(victim, budget)


@pytest.mark.parametrize("query", [None, [[0.5]], torch.rand(2, 1, 28, 28).numpy()], ids=["None", "list", "numpy"])
def test_what_is_not_a_tensor_is_refused_at_the_door_and_not_counted(victim, query):
    oracle = BlackBoxOracle(victim, 10)
    with pytest.raises(ValueError, match="queries must be a torch.Tensor .* torch.as_tensor"):
        oracle(query)
    assert oracle.queries_spent == 0


def test_a_meta_tensor_is_refused_and_not_counted(victim):
    oracle = BlackBoxOracle(victim, 10)
    with pytest.raises(ValueError, match="meta device"):
        oracle(torch.empty(2, 1, 28, 28, device="meta"))
    assert oracle.queries_spent == 0
