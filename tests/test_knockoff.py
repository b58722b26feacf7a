"""KnockoffNets on a tiny synthetic victim: it steals, it pays once, it resumes within budget."""

import pytest
import torch

from edm_lightning.attacks import BlackBoxOracle, KnockoffDataModule, build_transfer_set, run_knockoff
from edm_lightning.attacks.transfer_set import TransferSet
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from tests.helpers.victims import EVAL_SIZE, CountingVictim, linear_victim, untrained_agreement


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
        attempt(killed)  # killed inside the 4th oracle call: whether the victim answered is not known
    assert len(TransferSet.load(path)) == 3 * 64  # every answered batch was kept
    resumed = CountingVictim(linear_victim())
    result = attempt(resumed)
    assert result.lost == [[192, 64]]  # the batch in flight is charged, as if answered, to runs going past 192 items
    assert killed.rows + resumed.rows == 300 - 64 <= 300  # never past the budget, over both runs
    assert result.queries == 300 and len(result) == 300 - 64
    if strategy == "random":  # the resumed set is the start of the one an uninterrupted run buys, no image twice
        assert len(set(result.indices.tolist())) == len(result)
        fresh = tmp_path / "fresh.pt"
        uninterrupted = build_transfer_set(
            lambda spent: BlackBoxOracle(linear_victim(), 300, spent=spent), images, labels, 300, fresh, batch_size=64)
        assert torch.equal(uninterrupted.indices[: len(result)], result.indices)
        torch.testing.assert_close(uninterrupted.answers[: len(result)], result.answers)


def test_a_kill_between_the_answer_and_its_save_is_charged_on_resume(tmp_path, monkeypatch):
    """The corpus's example: answers bought but not yet saved are not bought again past the budget."""
    images = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(500) % 10
    path = tmp_path / "transfer.pt"
    real_save, saves = TransferSet.save, []

    def killed_on_third_save(self, target):
        saves.append(len(self))
        if len(saves) == 3:
            raise KeyboardInterrupt("simulated SIGKILL after the victim answered, before the answers were saved")
        real_save(self, target)

    first = CountingVictim(linear_victim())
    monkeypatch.setattr(TransferSet, "save", killed_on_third_save)
    with pytest.raises(KeyboardInterrupt):
        build_transfer_set(lambda spent: BlackBoxOracle(first, 300, spent=spent), images, labels, 300, path, batch_size=64)
    monkeypatch.setattr(TransferSet, "save", real_save)
    assert first.rows == 3 * 64 and len(TransferSet.load(path)) == 2 * 64  # the third batch was answered, not saved
    second = CountingVictim(linear_victim())
    result = build_transfer_set(lambda spent: BlackBoxOracle(second, 300, spent=spent), images, labels, 300, path,
                                batch_size=64)
    assert first.rows + second.rows == 300  # exactly the budget over both runs (3064 for 3000 before)
    assert result.queries == 300 and result.lost == [[128, 64]]
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "transfer.pt.pending").exists()
    silent = CountingVictim(linear_victim(), fail_after_calls=0)  # any query would raise
    again = build_transfer_set(lambda spent: BlackBoxOracle(silent, 300, spent=spent), images, labels, 300, path,
                               batch_size=64)
    assert again.queries == 300 and len(again) == len(result) and silent.rows == 0
    # a smaller budget reads a prefix bought before the kill: it never needed the lost answers and is not charged
    prefix = build_transfer_set(lambda spent: BlackBoxOracle(silent, 128, spent=spent), images, labels, 128, path,
                                batch_size=64)
    assert len(prefix) == 128 and prefix.queries == 128


def test_lost_answers_are_charged_only_to_runs_that_go_past_them():
    lost = TransferSet(torch.arange(300), torch.rand(300, 10), lost=[[100, 50], [200, 30]])
    assert [lost.items_within(b) for b in (90, 100, 120, 150, 151, 230, 280, 281, 330)] == [90, 100, 100, 100, 101, 180,
                                                                                           200, 201, 250]
    assert lost.charged(100) == 0 and lost.charged(101) == 50 and lost.charged(300) == 80 and lost.queries == 380
    averaged = TransferSet(torch.arange(10), torch.rand(10, 10), query_copies=8, lost=[[5, 16]])
    assert averaged.items_within(40) == 5 and averaged.items_within(64) == 6 and averaged.queries == 96


def test_a_half_written_save_leaves_no_temporary_file_behind(tmp_path):
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    path = tmp_path / "transfer.pt"
    (tmp_path / ".transfer.pt.12345.tmp").write_bytes(b"")  # what a kill inside torch.save leaves
    build_transfer_set(lambda spent: BlackBoxOracle(linear_victim(), 64, spent=spent), images, torch.zeros(50, dtype=torch.long),
                       64, path, batch_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transfer.pt", "transfer.pt.lock"]


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


# Query averaging: K noisy copies per surrogate image, the clone trains on the mean answer.


def test_query_averaging_spends_exactly_k_times_the_queries_it_reports_per_item(victim, fake_data, tmp_path):
    results = knockoff(victim, tmp_path, max_epochs=1, query_copies=4, copy_noise=0.05)
    assert results["transfer_set"] == 128 and results["queries_per_item"] == 4
    assert results["queries"] == results["queries_this_run"] == 4 * results["transfer_set"] == 512
    assert results["extra_queries"] == 3 * 128 and results["attack"] == "knockoff-random-avg4"
    assert victim.rows == 512 + EVAL_SIZE  # the victim saw every copy, and nothing else but its test set
    again = knockoff(victim, tmp_path, max_epochs=1, query_copies=4, copy_noise=0.05, budget=510)
    assert (again["transfer_set"], again["queries"], again["queries_this_run"]) == (127, 508, 0)  # a cached prefix


def test_averaged_answers_are_the_mean_of_the_victims_answers_to_the_noisy_copies(tmp_path):
    from edm_lightning.data.perturbations import noisy_copies

    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    victim = CountingVictim(linear_victim())
    result = build_transfer_set(lambda spent: BlackBoxOracle(victim, 150, spent=spent), images, torch.arange(50) % 10,
                                150, tmp_path / "t.pt", batch_size=30, query_copies=3, copy_noise=0.1, seed=5)
    assert len(result) == 50 and result.queries == victim.rows == 150
    x = images[result.indices].float() / 255
    copies = noisy_copies(x, 3, 0.1, seed=5)
    assert copies.min() >= 0 and copies.max() <= 1 and not torch.equal(copies[0], copies[1])
    with torch.no_grad():
        expected = linear_victim()(copies).view(50, 3, -1).mean(dim=1)
    torch.testing.assert_close(result.answers, expected)


def test_shifted_copies_are_the_image_moved_by_at_most_the_shift():
    from edm_lightning.data.perturbations import noisy_copies

    x = torch.zeros(3, 1, 12, 12)
    x[:, :, 5, 6] = 1.0  # one bright pixel: its position in each copy gives the offset
    copies = noisy_copies(x, 16, 0.0, seed=1, shift=2)
    assert copies.shape == (48, 1, 12, 12)
    positions = [tuple(int(v) for v in (c[0] == 1).nonzero()[0]) for c in copies]
    offsets = {(row - 5, column - 6) for row, column in positions}
    assert all(c.sum() == 1 for c in copies)  # moved, not blurred or lost
    assert all(abs(dy) <= 2 and abs(dx) <= 2 for dy, dx in offsets) and len(offsets) > 4
    torch.testing.assert_close(copies, noisy_copies(x, 16, 0.0, seed=1, shift=2))  # reproducible
    assert not torch.equal(copies, noisy_copies(x, 16, 0.0, seed=2, shift=2))
    # one item's copies do not depend on how the run was split into batches
    torch.testing.assert_close(copies[16:], noisy_copies(x[1:], 16, 0.0, seed=1, start=1, shift=2))


def test_averaging_over_a_keyed_hash_recovers_the_members_mean():
    """Why the attack matters: a byte hash sends each noisy copy to a random member, so the mean answer
    tends to the ensemble's average; one plain query sees one member."""
    from edm_lightning.data.perturbations import noisy_copies
    from edm_lightning.defense import Victim
    from edm_lightning.routing import KeyedHashRouter

    members = [linear_victim(seed).members[0] for seed in (0, 1, 2)]
    ensemble = Victim(members, KeyedHashRouter(3, "secret"), (1, 28, 28), 10).eval()
    x = torch.rand(20, 1, 28, 28)
    with torch.no_grad():
        mean_of_members = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
        single = ensemble(x)
        averaged = ensemble(noisy_copies(x, 64, 0.01)).view(20, 64, -1).mean(dim=1)
    assert (averaged - mean_of_members).abs().sum(-1).mean() < 0.5 * (single - mean_of_members).abs().sum(-1).mean()


def test_query_averaging_settings_never_share_a_cache(fake_data, tmp_path):
    def cache(**options):
        return KnockoffDataModule(linear_victim(), root=str(tmp_path), budget=512, **options).cache_path

    paths = {cache(), cache(query_copies=4), cache(query_copies=4, copy_noise=0.05), cache(query_copies=8, copy_noise=0.05),
             cache(copy_noise=0.05), cache(query_copies=4, copy_noise=0.05, copy_shift=2)}
    assert len(paths) == 6
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    path = tmp_path / "shared.pt"
    build_transfer_set(lambda spent: BlackBoxOracle(linear_victim(), 80, spent=spent), images, torch.arange(40) % 10, 80, path,
                       batch_size=40, query_copies=2, copy_noise=0.1)
    with pytest.raises(ValueError, match="bought with query_copies=2, copy_noise=0.1, copy_shift=0, not 4, 0.1, 0"):
        build_transfer_set(lambda spent: BlackBoxOracle(linear_victim(), 80, spent=spent), images, torch.arange(40) % 10, 80,
                           path, batch_size=40, query_copies=4, copy_noise=0.1)


@pytest.mark.parametrize("options, message", [
    ({"query_copies": 0}, "query_copies must be an integer >= 1"),
    ({"query_copies": 2.5}, "query_copies must be an integer >= 1"),
    ({"copy_noise": -0.1}, r"copy_noise must be in \[0, 1\]"),
    ({"query_copies": 1000, "budget": 512}, "cannot buy one image"),
    ({"copy_shift": -1}, r"copy_shift must be an integer in \[0, 8\]"),
    ({"copy_shift": 1.5}, r"copy_shift must be an integer in \[0, 8\]"),
])
def test_bad_query_averaging_settings_fail_before_any_query(victim, fake_data, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        knockoff(victim, tmp_path, **options)
    assert victim.rows == 0


@pytest.mark.parametrize("setting", [{"policy_lr": float("nan")}, {"policy_lr": float("inf")},
                                     {"diversity_window": float("nan")}, {"policy_lr": 0.0}])
def test_the_adaptive_policy_refuses_settings_that_are_no_finite_positive_number(setting, tmp_path):
    with pytest.raises(ConfigError, match="diversity_window and policy_lr must be finite and positive"):
        KnockoffDataModule(linear_victim(), root=str(tmp_path), budget=512, strategy="adaptive", **setting)


# A stronger attacker: the pool reshaped (thickened, moved) before it is queried.


def test_the_reshaped_pool_is_what_the_victim_answers_and_the_clone_trains_on(fake_data, tmp_path):
    from edm_lightning.data.perturbations import dilate_affine

    victim = CountingVictim(linear_victim())
    data = KnockoffDataModule(victim, root=str(tmp_path), budget=128, pool_transform="dilate-affine", seed=3,
                              cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    x, answers = data.train_set.tensors
    raw, _ = data.load_attacker_images("mnist")
    reshaped = dilate_affine(raw, seed=3)[data.transfer.indices].float() / 255
    assert victim.rows == 128 + EVAL_SIZE and torch.equal(x, reshaped)
    assert not torch.equal(x, raw[data.transfer.indices].float() / 255)
    with torch.no_grad():
        torch.testing.assert_close(answers, linear_victim()(x))  # the victim answered the reshaped images
    plain = KnockoffDataModule(victim, root=str(tmp_path), budget=128, seed=3, cache_dir=str(tmp_path / "cache"))
    assert plain.cache_path != data.cache_path and data.figures()["pool_transform"] == "dilate-affine"
    assert data.figures()["attack"] == "knockoff-random-dilate-affine" and plain.figures()["attack"] == "knockoff-random"


def test_the_reshaped_attack_spends_exactly_the_queries_it_reports(victim, fake_data, tmp_path):
    results = knockoff(victim, tmp_path, max_epochs=1, pool_transform="dilate-affine")
    assert results["queries"] == results["queries_this_run"] == 512 and victim.rows == 512 + EVAL_SIZE
    again = knockoff(victim, tmp_path, max_epochs=1, pool_transform="dilate-affine", budget=256)
    assert (again["queries"], again["queries_this_run"]) == (256, 0) and victim.rows == 512 + 2 * EVAL_SIZE


def test_an_unknown_pool_transform_fails_before_any_query_and_names_the_allowed(victim, fake_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown pool_transform 'elastic': expected one of 'none', 'dilate-affine'"):
        knockoff(victim, tmp_path, pool_transform="elastic")
    assert victim.rows == 0


def test_dilate_affine_thickens_and_moves_each_image_reproducibly():
    from edm_lightning.data.perturbations import dilate_affine

    strokes = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    strokes[:, :, 8:20, 13] = 255  # a one-pixel-wide vertical stroke, as a thin digit
    out = dilate_affine(strokes, seed=0)
    assert out.dtype == torch.uint8 and out.shape == strokes.shape
    assert torch.equal(out, dilate_affine(strokes, seed=0)) and not torch.equal(out, dilate_affine(strokes, seed=1))
    assert torch.equal(out, dilate_affine(strokes, seed=0, chunk=7))  # chunks bound the memory, not the result
    with pytest.raises(ValueError, match="chunk must be a whole number >= 1"):
        dilate_affine(strokes, seed=0, chunk=-1)  # would return the empty buffer otherwise
    ink = out.float().sum(dim=(1, 2, 3)) / strokes[0].float().sum()
    assert ink.mean() > 2 and (ink > 1.5).float().mean() > 0.5  # thickened (3 or 5 wide) for about 2 in 3 images
    centre = (out.float() * torch.arange(28).view(1, 1, 1, 28)).sum(dim=(1, 2, 3)) / out.float().sum(dim=(1, 2, 3))
    assert centre.std() > 0.5 and (centre - 13).abs().max() < 28 * 0.1 + 4  # moved by translation, rotation, shear
    floats = dilate_affine(strokes.float() / 255, seed=0)
    assert floats.dtype == torch.float32 and 0 <= floats.min() and floats.max() <= 1
    assert (floats * 255 - out.float()).abs().max() <= 0.5 + 1e-4  # the same images, uint8 rounded
