"""EDM beyond the paper: disagreement on points synthesised as attacks make them, agreement on benign corruptions."""

import lightning as L
import pytest
import torch

from edm_lightning.checkpoints import read_checkpoint
from edm_lightning.data.perturbations import jacobian_augmentation
from edm_lightning.errors import ConfigError
from edm_lightning.models import EnsembleModule, Synthesis
from edm_lightning.models.synthesis import jacobian_points, mixup_points
from edm_lightning.nets import build_net


def batch(n=32, seed=0):
    """Smooth random images (structure at 4-pixel scale, so a 1-pixel shift is a mild change) and labels."""
    coarse = torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=28, mode="bilinear").clamp(0, 1), torch.arange(n) % 10


def test_synthesised_points_are_drawn_from_the_seed_and_the_training_batch_alone():
    torch.manual_seed(0)
    members = torch.nn.ModuleList(build_net("lenet5", (1, 28, 28), 10) for _ in range(3))
    x, y = batch()
    synthesis = Synthesis(disagree_on=["jacobian", "mixup"], epsilon=0.1, steps=3)
    runs = []
    for seed in (5, 5, 6):
        L.seed_everything(seed, verbose=False)
        runs.append(synthesis.disagreement_points(members, x, y, 10))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    jacobian, mixed = runs[0][: len(x)], runs[0][len(x):]
    # every Jacobian point is 1 to 3 steps of 0.1 from its own training image (so never another set's image) ...
    distance = (jacobian - x).abs().flatten(1).amax(dim=1)
    assert (distance > 0.09).all() and (distance <= 0.3 + 1e-6).all()
    assert jacobian.min() >= 0 and jacobian.max() <= 1
    # ... and every mixup point lies between two training images of the batch
    assert len(mixed) <= len(x) and ((mixed >= 0) & (mixed <= 1)).all()


def test_jacobian_steps_move_towards_another_class_and_leave_the_net_untouched():
    torch.manual_seed(0)
    net = build_net("lenet5", (1, 28, 28), 10)
    x, y = batch(64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    points = jacobian_points(net, x, y, 10, epsilon=0.05, steps=1)
    torch.manual_seed(1)
    target = (y + torch.randint(1, 10, y.shape)) % 10  # the same draw jacobian_points made
    assert (target != y).all()
    with torch.no_grad():
        gain = (net(points).log_softmax(-1) - net(x).log_softmax(-1)).gather(1, target[:, None])
    assert (gain > 0).float().mean() > 0.9  # one signed step raises the target class's log-probability
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_each_jacobian_point_takes_exactly_its_drawn_steps_and_only_moving_images_reach_the_net():
    torch.manual_seed(0)
    net = build_net("lenet5", (1, 28, 28), 10)
    x, y = batch(48)
    original, sizes = x.clone(), []
    hook = net.register_forward_pre_hook(lambda _, inputs: sizes.append(len(inputs[0])))
    torch.manual_seed(2)
    points = jacobian_points(net, x, y, 10, epsilon=0.05, steps=3)
    hook.remove()
    assert torch.equal(x, original)
    torch.manual_seed(2)
    target = (y + torch.randint(1, 10, y.shape)) % 10  # the draws jacobian_points made, in its order
    taken = torch.randint(1, 4, (len(x),))
    chain, expected = x.clone(), x.clone()  # every image stepped 3 times; image i kept after taken[i] steps
    for step in range(1, 4):
        chain = jacobian_augmentation(net, chain, y, 0.05, target)
        expected[taken == step] = chain[taken == step]
    # the same points; a near-zero gradient may take the other sign at another batch size (a pixel off by epsilon)
    assert ((points - expected).abs() > 1e-6).float().mean() < 1e-3
    # one forward per step, on the images still moving: all of them, then those drawn for 2 or 3 steps, then 3
    assert sizes == [len(x), int((taken >= 2).sum()), int((taken == 3).sum())]


def test_mixup_blends_only_images_of_different_classes():
    x = torch.arange(10).float().view(10, 1, 1, 1).expand(10, 1, 4, 4).clone() / 10  # image value = its class / 10
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    x[5:] = 0.9
    torch.manual_seed(0)
    mixed = mixup_points(x, y)
    assert len(mixed) >= 1
    # a blend of a class-0 image (value <= 0.4) and a class-1 image (0.9) with weights in [0.3, 0.7]
    values = mixed[:, 0, 0, 0]
    assert ((values >= 0.3 * 0.9 - 1e-6) & (values <= 0.7 * 0.4 + 0.3 * 0.9 + 0.7 * 0.9)).all()
    assert not any(torch.isclose(values, torch.tensor(v)).any() for v in (0.0, 0.9))  # never an image alone


def test_training_step_adds_the_points_to_the_diversity_batch_and_the_copy_to_the_accuracy_batch(monkeypatch):
    torch.manual_seed(0)
    synthesis = Synthesis(disagree_on=["jacobian", "noise"], agree_noise=0.02, agree_shift=1)
    module = EnsembleModule("lenet5", num_members=3, synthesis=synthesis)
    seen = {}
    original = module.member_logits

    def spy(x, x_ood):
        seen["x"], seen["ood"] = x, x_ood
        return original(x, x_ood)

    monkeypatch.setattr(module, "member_logits", spy)
    x, y = batch(16)
    loss = module.training_step({"id": (x, y), "ood": torch.rand(8, 1, 28, 28)}, 0)
    assert seen["ood"].shape[0] == 8 + 16 + 16 and seen["x"].shape[0] == 32
    assert torch.equal(seen["x"][:16], x) and not torch.equal(seen["x"][16:], x)  # the copy is corrupted
    assert (seen["x"][16:] - x).abs().mean() < 0.1  # ... mildly
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("weight, terms", [(None, [8 + 16]), (0.5, [8, 16])], ids=["pooled", "weighted"])
def test_the_synthesised_points_weigh_in_the_diversity_term_as_their_weight_says(monkeypatch, weight, terms):
    """Pooled (``weight`` None): one mean over OOD images and points; weighted: the OOD set's term whole, the points'
    term times ``weight`` beside it (both times lambda)."""
    torch.manual_seed(0)
    module = EnsembleModule("lenet5", num_members=3, diversity_weight=2.0,
                            synthesis=Synthesis(disagree_on=["noise"], weight=weight))
    seen, calls = {}, []
    forward, member_logits = module.diversity.forward, module.member_logits

    def diversity(probs):
        calls.append((probs.shape[1], forward(probs)))
        return calls[-1][1]

    def logits(x, x_ood):
        seen["id"] = member_logits(x, x_ood)[0]
        return member_logits(x, x_ood)

    monkeypatch.setattr(module.diversity, "forward", diversity)
    monkeypatch.setattr(module, "member_logits", logits)
    x, y = batch(16)
    loss = module.training_step({"id": (x, y), "ood": torch.rand(8, 1, 28, 28)}, 0)
    assert [n for n, _ in calls] == terms
    ce = torch.nn.functional.cross_entropy(seen["id"].flatten(0, 1), y.repeat(3))
    expected = calls[0][1] if weight is None else calls[0][1] + weight * calls[1][1]
    assert loss.item() == pytest.approx((ce + 2.0 * expected).item(), rel=1e-6)


def test_a_weighted_mixup_term_without_points_adds_nothing_rather_than_nan():
    torch.manual_seed(0)
    module = EnsembleModule("lenet5", num_members=2, synthesis=Synthesis(disagree_on=["mixup"], weight=1.0))
    x, _ = batch(8)
    ood = torch.rand(4, 1, 28, 28)
    loss = module.training_step({"id": (x, torch.zeros(8, dtype=torch.long)), "ood": ood}, 0)  # one class: no blend
    torch.manual_seed(0)
    plain = EnsembleModule("lenet5", num_members=2)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(
        plain.training_step({"id": (x, torch.zeros(8, dtype=torch.long)), "ood": ood}, 0).item(), rel=1e-6)


def test_the_paper_ensemble_is_unchanged_and_a_synthesis_checkpoint_reads_safely(checkpoint_factory, monkeypatch):
    plain = EnsembleModule("lenet5", num_members=2)
    assert "synthesis" not in plain.hparams and plain.synthesis == Synthesis()
    module = EnsembleModule("lenet5", num_members=2, synthesis=Synthesis(disagree_on=["mixup"]))
    state = read_checkpoint(checkpoint_factory(module, "synthesis.ckpt"), "Ensemble")  # torch.load(weights_only=True)
    assert state["hyper_parameters"]["synthesis"]["disagree_on"] == ["mixup"]
    again = EnsembleModule("lenet5", num_members=2, synthesis=state["hyper_parameters"]["synthesis"])
    assert again.synthesis == module.synthesis


@pytest.mark.parametrize("settings, message", [
    ({"disagree_on": ["gan"]}, "disagree_on must name each of jacobian, mixup, noise at most once"),
    ({"disagree_on": ["mixup", "mixup"]}, "at most once"),
    ({"epsilon": float("nan")}, "epsilon must be a number in \\[0, 1\\]"),
    ({"agree_noise": 2.0}, "synthesis.agree_noise must be in \\[0, 1\\]"),
    ({"steps": 0}, "steps must be an integer in \\[1, 20\\]"),
    ({"agree_shift": 9}, "synthesis.agree_shift must be an integer in \\[0, 8\\]"),
    ({"disagree_on": ["noise"], "weight": -1.0}, "synthesis.weight must be a number in \\[0, 100\\]"),
    ({"weight": 0.5}, "weighs synthesised points, but disagree_on names none"),
])
def test_bad_synthesis_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Synthesis(**settings)
