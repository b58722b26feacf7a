"""The mixture clone recovers both members of a victim that answers with one of two functions by a hidden rule."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from edm_lightning.errors import ConfigError
from edm_lightning.models import CloneModule, MixtureCloneModule, OptimConfig
from edm_lightning.models.mixture_clone import assign_heads, split_last_linear
from edm_lightning.nets import build_net
from edm_lightning.routing import KeyedHashRouter

CLASSES = 3


def stripes(count: int, seed: int) -> torch.Tensor:
    """Smooth images whose class (for member A) is the brightest of three vertical stripes."""
    coarse = torch.rand(count, 1, 4, 3, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(28, 28), mode="nearest")


def member_answers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two members that disagree everywhere: A's class is the brightest stripe, B's the next one (mod 3)."""
    a = torch.nn.functional.adaptive_avg_pool2d(x, (1, CLASSES)).flatten(1).argmax(-1)
    b = (a + 1) % CLASSES
    soft = lambda c: torch.full((len(x), CLASSES), 0.05).scatter_(1, c[:, None], 0.9)  # noqa: E731
    return soft(a), soft(b)


def fit(module, x, target, epochs=12):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(x, target), batch_size=64, shuffle=True))
    return module.eval()


def test_the_mixture_clone_reproduces_both_members_where_a_single_clone_cannot():
    x = stripes(3000, seed=0)
    a, b = member_answers(x)
    hidden = KeyedHashRouter(2, "hidden rule")(x).bool()  # the attacker knows neither the rule nor the key
    answers = torch.where(hidden[:, None], b, a)
    optim = OptimConfig(lr=3e-3, schedule="constant")
    test = stripes(1000, seed=1)
    ta, tb = (p.argmax(-1) for p in member_answers(test))
    mixture = fit(MixtureCloneModule(num_classes=CLASSES, optim=optim, heads=2), x, answers)
    single = fit(CloneModule(num_classes=CLASSES, optim=optim), x, answers)
    with torch.no_grad():
        heads, one = mixture.head_logits(test).argmax(-1), single(test).argmax(-1)  # (N, 2), (N,)
    # Both members' answers among the heads' (which head takes which member may change from input to input).
    both = ((heads == ta[:, None]).any(1) & (heads == tb[:, None]).any(1)).float().mean()
    assert both > 0.9, both
    assert min((one == ta).float().mean(), (one == tb).float().mean()) < 0.75  # one head cannot hold both


def test_assignment_and_heads_are_checked():
    assert torch.equal(assign_heads(torch.tensor([[0.2, 1.0]]), "hard"), torch.tensor([[1.0, 0.0]]))
    soft = assign_heads(torch.tensor([[0.2, 1.0]]), "soft", temperature=1.0)
    assert torch.allclose(soft.sum(1), torch.ones(1)) and soft[0, 0] > soft[0, 1]
    favoured = torch.tensor([[0.1, 2.0]] * 6 + [[1.0, 1.1]] * 2)  # head 0 explains every answer best
    assert assign_heads(favoured, "hard")[:, 1].sum() == 0  # unbalanced: head 1 gets nothing and would die
    balanced = assign_heads(favoured, "soft", temperature=1.0, balanced=True)
    assert torch.allclose(balanced.sum(0), torch.full((2,), 4.0), atol=0.1) and torch.allclose(balanced.sum(1), torch.ones(8))
    trunk, features = split_last_linear(build_net("lenet5", (1, 28, 28), 10))
    assert trunk(torch.rand(2, 1, 28, 28)).shape == (2, features)
    with pytest.raises(ConfigError, match="heads must be"):
        MixtureCloneModule(heads=0)
    with pytest.raises(ConfigError, match="assignment must be"):
        MixtureCloneModule(assignment="greedy")
