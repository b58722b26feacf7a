"""JBDA / JBDA-TR on a tiny synthetic victim: Jacobian steps, doubling rounds, cached rounds."""

import pytest
import torch

from edm_lightning.attacks import JBDADataModule, jacobian_augmentation, run_jbda
from edm_lightning.nets import build_net
from tests.helpers.victims import EVAL_SIZE, linear_victim, untrained_agreement


def jbda(victim, tmp_path, **overrides):
    options = dict(seed_size=40, rounds=3, epochs_per_round=4, epsilon=0.1, batch_size=64,
                   cache_dir=str(tmp_path / "cache"), root=str(tmp_path))
    options.update(overrides)
    return run_jbda(victim, **options)


def test_steps_are_epsilon_sign_steps_inside_the_image_range():
    torch.manual_seed(0)
    net = build_net("lenet5", (1, 28, 28), 10)
    x = torch.rand(8, 1, 28, 28)
    labels = torch.randint(0, 10, (8,))
    out = jacobian_augmentation(net, x, labels, 0.1)
    step = (out - x).abs()
    inside = (x > 0.1) & (x < 0.9)  # away from the clipping edges every pixel moves by exactly epsilon
    torch.testing.assert_close(step[inside], torch.full_like(step[inside], 0.1))
    assert out.min() >= 0 and out.max() <= 1


def test_targeted_steps_raise_the_target_probability():
    torch.manual_seed(0)
    net = build_net("lenet5", (1, 28, 28), 10)
    x = torch.rand(32, 1, 28, 28) * 0.6 + 0.2
    labels = torch.zeros(32, dtype=torch.long)
    targets = torch.randint(1, 10, (32,))
    out = jacobian_augmentation(net, x, labels, 0.05, targets)
    before = net(x).log_softmax(1).gather(1, targets[:, None])
    after = net(out).log_softmax(1).gather(1, targets[:, None])
    assert (after > before).float().mean() > 0.9


@pytest.mark.parametrize("targeted", [False, True])
def test_clone_beats_untrained_and_pays_seed_times_two_to_the_rounds(victim, fake_data, tmp_path, targeted):
    results = jbda(victim, tmp_path, targeted=targeted)
    floor = untrained_agreement(JBDADataModule(linear_victim(), root=str(tmp_path), seed_size=40, budget=320))
    assert results["queries"] == results["queries_this_run"] == 40 * 2**3 == victim.rows - EVAL_SIZE
    assert [entry["queries"] for entry in results["rounds"]] == [40, 80, 160, 320]
    assert results["agreement"] > floor + 0.3, (results, floor)


def test_rerun_reuses_every_round_and_budget_caps_the_last_one(victim, fake_data, tmp_path):
    first = jbda(victim, tmp_path, rounds=2, epochs_per_round=1)
    again = jbda(victim, tmp_path, rounds=2, epochs_per_round=1)
    assert (again["queries"], again["queries_this_run"]) == (first["queries"], 0) == (160, 0)
    capped = jbda(victim, tmp_path / "capped", rounds=2, epochs_per_round=1, budget=130)
    assert capped["queries"] == 130 and capped["train_size"] == 130


def test_bad_input_fails_before_any_query(victim, fake_data, tmp_path):
    with pytest.raises(ValueError, match="exceeds the budget"):
        jbda(victim, tmp_path, budget=30)
    with pytest.raises(ValueError, match="epsilon"):
        jbda(victim, tmp_path, epsilon=0)
    assert victim.rows == 0


@pytest.mark.parametrize("change", [
    lambda blob: {**blob, "lost": -160},
    lambda blob: {**blob, "lost": 2.5},
    lambda blob: {**blob, "answers": torch.cat([blob["answers"], blob["answers"][:1]])},
    lambda blob: {**blob, "answers": blob["answers"].index_fill(0, torch.tensor([2]), float("nan"))},
    lambda blob: {**blob, "x": blob["x"] * 3},
    lambda blob: {key: value for key, value in blob.items() if key != "answers"},
], ids=["negative lost", "fractional lost", "a row more", "NaN answers", "pixels outside [0, 1]", "no answers"])
def test_a_damaged_round_file_is_refused_with_its_name_before_any_query(fake_data, tmp_path, change):
    """A round read back is checked like input from outside: a negative ``lost`` count would let the attack buy past its
    budget, an extra answer would shift every answer after it."""
    from tests.helpers.attacks import assert_a_damaged_round_is_refused

    settings = dict(root=str(tmp_path), seed_size=40, budget=160, batch_size=32, cache_dir=str(tmp_path / "cache"))
    assert_a_damaged_round_is_refused(JBDADataModule, settings, tmp_path / "cache", "jbda", change)
