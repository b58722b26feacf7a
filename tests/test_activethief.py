"""ActiveThief on tiny data: k-center coverage, entropy selection, rounds that split the budget, bad input refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edm_lightning.attacks import ATTACKS
from edm_lightning.attacks.activethief import check_rounds, entropy_selection, kcenter_selection
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import run_experiment
from edm_lightning.experiment.config import AttackConfig
from tests.helpers.experiment import tiny_config
from tests.helpers.victims import EVAL_SIZE


def test_kcenter_picks_the_points_farthest_from_the_chosen_set_on_a_toy_2d_pool():
    grid = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij"), dim=-1).view(-1, 2)
    chosen = torch.tensor([[0.0, 0.0]])
    picked = kcenter_selection(grid, chosen, count=3)
    assert grid[picked[0]].tolist() == [4.0, 4.0]  # the farthest from (0, 0)
    assert {tuple(grid[i].tolist()) for i in picked[1:]} == {(0.0, 4.0), (4.0, 0.0)}  # then the two other corners
    # every pick maximises the distance to the chosen set and the earlier picks, over the whole pool
    centres = chosen
    for index in picked:
        nearest = torch.cdist(grid, centres).min(dim=1).values
        assert nearest[index] == nearest.max()
        centres = torch.cat([centres, grid[index][None]])


def test_kcenter_never_picks_a_point_twice_and_entropy_picks_the_least_sure():
    pool = torch.rand(50, 3)
    picked = kcenter_selection(pool, torch.empty(0, 3), count=50)
    assert sorted(picked.tolist()) == list(range(50))
    probs = torch.tensor([[0.98, 0.01, 0.01], [0.34, 0.33, 0.33], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    assert entropy_selection(probs, 2).tolist() == [1, 2]


def test_rounds_split_the_budget_and_every_query_is_reported(victim, fake_data, tmp_path: Path):
    results = ATTACKS.get("activethief").run(victim, budget=200, initial_size=40, rounds=3, epochs_per_round=1, batch_size=32,
                              strategy="uncertainty", cache_dir=str(tmp_path / "cache"), root=str(tmp_path))
    assert [entry["queries"] for entry in results["rounds"]] == [40, 93, 146, 200]  # 160 left: 53, 53, 54
    assert results["queries"] == results["queries_this_run"] == 200 == victim.rows - EVAL_SIZE
    assert results["transfer_set"] == 200 and results["attack"] == "activethief-uncertainty"
    again = ATTACKS.get("activethief").run(victim, budget=200, initial_size=40, rounds=3, epochs_per_round=1, batch_size=32,
                            strategy="uncertainty", cache_dir=str(tmp_path / "cache"), root=str(tmp_path))
    assert (again["queries"], again["queries_this_run"]) == (200, 0)  # every round read back, none bought twice


@pytest.mark.parametrize("options, message", [
    ({"rounds": 0}, "rounds must be an integer >= 1"),
    ({"initial_size": 200}, r"initial_size must be an integer in \[1, budget\)"),
    ({"initial_size": 195, "rounds": 10}, "too few for 10 rounds"),
])
def test_a_budget_the_rounds_cannot_split_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        check_rounds(200, options)


def test_bad_rounds_and_an_unknown_strategy_are_refused_before_the_first_stage(fake_root: Path, tmp_path: Path):
    for options, message in (({"rounds": 200}, r"attack activethief \(budget 128\): .*too few for 200 rounds"),
                             ({"strategy": "smartest"}, "options.strategy: Expected a typing.Literal")):
        attack = AttackConfig(name="activethief", budgets=[128], options={"batch_size": 32, **options})
        with pytest.raises(ConfigError, match=message):
            run_experiment(tiny_config(fake_root, tmp_path, attacks=[attack]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change", [
    lambda blob: {**blob, "lost": -40},
    lambda blob: {**blob, "chosen": blob["chosen"] + 10_000},
    lambda blob: {**blob, "chosen": blob["chosen"][[0] * len(blob["chosen"])]},
    lambda blob: {**blob, "answers": torch.cat([blob["answers"], blob["answers"][:1]])},
    lambda blob: {**blob, "answers": blob["answers"] * 2},
    lambda blob: "not a round",
], ids=["negative lost", "outside the pool", "repeated picks", "a row more", "unnormalised answers", "not a mapping"])
def test_a_damaged_round_file_is_refused_with_its_name_before_any_query(fake_data, tmp_path: Path, change):
    from edm_lightning.attacks.activethief import ActiveThiefDataModule
    from tests.helpers.attacks import assert_a_damaged_round_is_refused

    settings = dict(root=str(tmp_path), budget=200, initial_size=40, rounds=2, batch_size=32,
                    cache_dir=str(tmp_path / "cache"))
    assert_a_damaged_round_is_refused(ActiveThiefDataModule, settings, tmp_path / "cache", "activethief", change)
