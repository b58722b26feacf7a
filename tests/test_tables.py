"""Experiment bookkeeping: stage caching and the results tables and plots."""

import csv
from pathlib import Path

import pytest

from edm_lightning.experiment.outputs import _strongest_attacks
from edm_lightning.experiment.stages import StageStore
from edm_lightning.experiment.tables import (
    best_within,
    plot_budget_curve,
    plot_tradeoff,
    setting,
    strongest_attacks,
    strongest_attacks_markdown,
    summarise,
    write_csv,
    write_markdown,
)
from edm_lightning.files import digest


def test_digest_is_stable_and_order_independent():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_a_finished_stage_is_not_run_again(tmp_path: Path):
    store, calls = StageStore(tmp_path), []

    def work(folder: Path) -> dict:
        calls.append(folder)
        return {"acc": 0.9}

    first = store.run("target", {"seed": 0}, work)
    second = store.run("target", {"seed": 0}, work)
    assert len(calls) == 1 and first == second and first["acc"] == 0.9
    store.run("target", {"seed": 1}, work)
    assert len(calls) == 2


def test_an_interrupted_stage_is_run_again_and_leaves_no_result(tmp_path: Path):
    store = StageStore(tmp_path)

    def killed(folder: Path) -> dict:
        (folder / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run("attack", {"budget": 10}, killed)
    assert store.cached("attack", {"budget": 10}) is None
    assert store.run("attack", {"budget": 10}, lambda folder: {"ok": (folder / "partial.bin").exists()}) ["ok"]


def _records():
    rows = []
    for seed, (none, edm) in enumerate([(0.60, 0.35), (0.62, 0.40)]):
        for defense, clone, weight in (("none", none, None), ("edm-neural", edm, 0.5)):
            for budget, scale in ((1000, 0.5), (5000, 1.0)):
                rows.append({"attack": "knockoff", "defense": defense, "diversity_weight": weight, "budget": budget,
                             "seed": seed, "defender_acc": 0.9, "clone_acc": clone * scale, "agreement": clone * scale,
                             "queries": budget, "wall_time_s": 10.0})
        rows.append({"attack": "knockoff", "defense": "edm-neural", "diversity_weight": 1.0, "budget": 5000, "seed": seed,
                     "defender_acc": 0.88, "clone_acc": 0.30, "agreement": 0.3, "queries": 5000, "wall_time_s": 10.0})
        # an output-perturbation defense at two strengths: the strong one costs 3 points of defender accuracy
        for beta, defender, clone in ((0.2, 0.895, 0.50), (0.8, 0.87, 0.20)):
            rows.append({"attack": "knockoff", "defense": "reverse-sigmoid", "diversity_weight": None,
                         "strength_name": "beta", "strength": beta, "budget": 5000, "seed": seed,
                         "defender_acc": defender, "clone_acc": clone + seed / 100, "agreement": clone,
                         "queries": 5000, "wall_time_s": 10.0})
    return rows



def test_summary_pairs_the_drop_by_seed():
    rows = summarise(_records(), budget=5000, diversity_weight=0.5)
    none, edm, weak, strong = rows
    assert (none["defense"], edm["defense"]) == ("none", "edm-neural")
    assert (weak["defense"], weak["strength"], strong["strength"]) == ("reverse-sigmoid", 0.2, 0.8)
    assert strong["defender_acc_loss_mean"] == pytest.approx(0.03)
    assert strong["clone_acc_drop_mean"] == pytest.approx((0.40 + 0.41) / 2)
    assert none["clone_acc_mean"] == pytest.approx(0.61)
    assert edm["clone_acc_mean"] == pytest.approx(0.375)
    assert edm["clone_acc_drop_mean"] == pytest.approx(0.235)  # (0.25 + 0.22) / 2
    assert edm["clone_acc_drop_std"] == pytest.approx(0.0212, abs=1e-3)
    assert "clone_acc_drop_mean" not in none


def test_tables_hold_the_measured_values(tmp_path: Path):
    rows = summarise(_records(), budget=5000, diversity_weight=0.5)
    write_csv(rows, tmp_path / "results.csv")
    text = write_markdown(rows, tmp_path / "results.md", "FashionMNIST")
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["clone_acc_mean"]) == pytest.approx(0.375)
    assert "| knockoff | edm-neural | lambda=0.5 | 90.0 ± 0.0 | 0.0 ± 0.0 | 37.5 ± 3.5 | 23.5 ± 2.1 |" in text
    assert "| knockoff | reverse-sigmoid | beta=0.8 | 87.0 ± 0.0 | 3.0 ± 0.0 | 20.5 ± 0.7 | 40.5 ± 0.7 |" in text
    assert (tmp_path / "results.md").read_text() == text


def test_best_within_a_point_ranks_by_clone_accuracy_and_excludes_costlier_defenses():
    rows = summarise(_records(), budget=5000, diversity_weight=0.5)
    best = best_within(rows, "knockoff", 0.01)
    assert [(r["defense"], r["strength"]) for r in best] == [("edm-neural", None), ("reverse-sigmoid", 0.2)]
    assert [r["strength"] for r in best_within(rows, "knockoff", 0.05)] == [0.8, None, 0.2]
    assert setting(best[1]) == "beta=0.2" and setting(best[0]) == "lambda=0.5"


def test_each_victim_is_judged_by_its_strongest_attack():
    # A second attack, run at 1,000 queries only: weaker than knockoff on the undefended model, stronger on EDM (as
    # JBDA-TR is). An attacker who can pay 5,000 can run it, so it counts at 5,000.
    records = _records() + [
        {**r, "attack": "jbda_tr", "budget": 1000,
         "clone_acc": {"none": 0.55, "edm-neural": 0.52}[r["defense"]] + r["seed"] / 100}
        for r in _records() if r["budget"] == 5000 and r["defense"] in ("none", "edm-neural")
        and r["diversity_weight"] in (None, 0.5)]
    # the same victims answering top-1 labels: judged apart, against the undefended top-1 victim
    records += [{**r, "attack": "knockoff-top1", "answers": "top-1", "clone_acc": r["clone_acc"] - 0.1}
                for r in _records() if r["budget"] == 5000 and r["defense"] in ("none", "edm-neural")]
    none, edm, *rest = strongest_attacks(records, 5000, diversity_weight=0.5)
    weak, strong, top1_none, top1_edm = rest
    assert (none["defense"], none["strongest"], none["clone_acc_mean"]) == ("none", "knockoff", pytest.approx(0.61))
    assert (edm["defense"], edm["strongest"], edm["strongest_budget"]) == ("edm-neural", "jbda_tr", 1000)
    assert edm["clone_acc_mean"] == pytest.approx(0.525)
    assert edm["protection_left"] == pytest.approx(0.61 - 0.525)  # not knockoff's 23.5-point drop
    assert list(edm["attacks"]) == ["jbda_tr", "knockoff"] and edm["untried"] == []
    # tried by knockoff only: judged against the undefended model under knockoff, and jbda_tr named as untried
    assert [(d["defense"], d["strength"]) for d in (weak, strong)] == [("reverse-sigmoid", 0.2), ("reverse-sigmoid", 0.8)]
    assert strong["protection_left"] == pytest.approx(0.61 - 0.205) and strong["untried"] == ["jbda_tr"]
    assert (top1_none["answers"], top1_edm["answers"]) == ("top-1", "top-1")
    assert top1_edm["protection_left"] == pytest.approx((0.61 - 0.1) - (0.375 - 0.1))  # against the top-1 undefended
    assert strongest_attacks(records, 1000, diversity_weight=0.5)[1]["attacks"] == {
        "jbda_tr": pytest.approx(0.525), "knockoff": pytest.approx(0.1875)}  # knockoff's 1,000-query run only
    text = "\n".join(strongest_attacks_markdown([none, edm, strong], 5000))
    assert ("| edm-neural | probabilities | lambda=0.5 | 90.0 ± 0.0 | jbda_tr (1,000) | 52.5 ± 0.7 | 8.5 "
            "| jbda_tr 52.5, knockoff 37.5 | - | 2 |") in text
    assert "| none | probabilities | - | 90.0 ± 0.0 | knockoff | 61.0 ± 1.4 | - |" in text
    assert ("| reverse-sigmoid | probabilities | beta=0.8 | 87.0 ± 0.0 | knockoff | 20.5 ± 0.7 | 40.5 | knockoff 20.5 "
            "| jbda_tr |") in text


def test_the_corrupted_defender_accuracy_gets_a_column_only_where_measured():
    records = _records()
    assert "corrupted" not in "\n".join(strongest_attacks_markdown(strongest_attacks(records, 5000, 0.5), 5000))
    # measured for the undefended model and EDM only (the reverse-sigmoid rows came from a run without it)
    measured = [{**r, "defender_acc_corrupted": r["defender_acc"] - 0.05} if r["defense"] in ("none", "edm-neural") else r
                for r in records]
    victims = strongest_attacks(measured, 5000, 0.5)
    by = {(v["defense"], v["strength"]): v for v in victims}
    assert by[("none", None)]["defender_acc_corrupted_mean"] == pytest.approx(0.85)
    assert "defender_acc_corrupted_mean" not in by[("reverse-sigmoid", 0.8)]
    text = "\n".join(strongest_attacks_markdown(victims, 5000))
    assert "| defender acc (%) | defender acc, corrupted (%) | strongest attack |" in text
    assert "| none | probabilities | - | 90.0 ± 0.0 | 85.0 ± 0.0 | knockoff |" in text
    assert "| reverse-sigmoid | probabilities | beta=0.8 | 87.0 ± 0.0 | - | knockoff |" in text


def test_the_largest_budget_judges_every_attack_even_when_no_two_ran_at_one_budget():
    # knockoff only at 1,000 queries, jbda_tr only at 5,000: no budget has two attacks, yet at 5,000 both count
    records = [r for r in _records() if r["budget"] == 1000 and r["defense"] in ("none", "edm-neural")]
    records += [{**r, "attack": "jbda_tr", "budget": 5000} for r in records]
    strongest = _strongest_attacks(records, diversity_weight=0.5)
    assert list(strongest) == [5000]
    assert [sorted(v["attacks"]) for v in strongest[5000]] == [["jbda_tr", "knockoff"]] * 2
    assert _strongest_attacks([], diversity_weight=0.5) == {}


def test_plots_are_written(tmp_path: Path):
    assert plot_budget_curve(_records(), "knockoff", 0.5, tmp_path / "budget.png")
    assert plot_tradeoff(_records(), "knockoff", 5000, tmp_path / "tradeoff.png")
    assert not plot_tradeoff([r for r in _records() if r["defense"] == "none"], "knockoff", 5000, tmp_path / "no.png")
    for name in ("budget.png", "tradeoff.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_budget_curve([r for r in _records() if r["budget"] == 5000], "knockoff", 0.5, tmp_path / "none.png")
