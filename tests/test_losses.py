"""The diversity loss: coherence 1 for identical members, 0 for orthogonal ones, and the paper's gradient."""

import math

import pytest
import torch

from edm_lightning.losses import DiversityLoss, coherence, diversity_loss, max_pairwise_similarity, pairwise_similarity


def random_probs(members=5, batch=8, classes=10, seed=0):
    return torch.randn(members, batch, classes, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_identical_members_have_coherence_one(temperature):
    probs = random_probs(members=1).expand(5, -1, -1)
    torch.testing.assert_close(coherence(probs, temperature), torch.ones(8))
    torch.testing.assert_close(max_pairwise_similarity(probs), torch.ones(8))


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_one_hot_members_on_different_classes_have_coherence_zero(temperature):
    labels = torch.tensor([[0, 3], [1, 4], [2, 5], [7, 6]])  # 4 members x batch 2, all different per input
    probs = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(coherence(probs, temperature), torch.zeros(2))
    torch.testing.assert_close(diversity_loss(probs, temperature), torch.tensor(0.0))


def test_coherence_is_a_smooth_max_between_mean_and_max_of_pairs():
    probs = random_probs()
    sims = pairwise_similarity(probs)
    assert sims.shape == (8, 10)  # 5 members: 10 pairs i < j
    soft = coherence(probs, temperature=1.0)
    assert (soft >= sims.mean(dim=-1) - 1e-6).all() and (soft <= sims.amax(dim=-1) + 1e-6).all()
    sharp = coherence(probs, temperature=1000.0)
    torch.testing.assert_close(sharp, sims.amax(dim=-1), atol=5e-3, rtol=0)


def test_temperature_one_has_the_papers_logsumexp_gradient():
    logits = torch.randn(5, 8, 10, requires_grad=True)
    ours = torch.autograd.grad(diversity_loss(logits.softmax(-1)), logits)[0]
    paper = torch.autograd.grad(torch.logsumexp(pairwise_similarity(logits.softmax(-1)), dim=-1).mean(), logits)[0]
    torch.testing.assert_close(ours, paper)
    # and the values differ by the constant log(number of pairs) only
    probs = logits.detach().softmax(-1)
    torch.testing.assert_close(
        coherence(probs) + math.log(10), torch.logsumexp(pairwise_similarity(probs), dim=-1)
    )


def test_a_gradient_step_on_the_loss_lowers_coherence():
    logits = torch.randn(5, 16, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss_fn = DiversityLoss()
    before = loss_fn(logits.softmax(-1))
    before.backward()
    with torch.no_grad():
        logits -= 1.0 * logits.grad
    assert loss_fn(logits.softmax(-1)) < before - 1e-3


def test_module_equals_function():
    probs = random_probs()
    torch.testing.assert_close(DiversityLoss(temperature=3.0)(probs), diversity_loss(probs, 3.0))


@pytest.mark.parametrize("shape", [(8, 10), (1, 8, 10), (2, 3, 4, 5)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="members"):
        coherence(torch.rand(shape).softmax(-1))


def test_bad_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        DiversityLoss(temperature=0.0)
