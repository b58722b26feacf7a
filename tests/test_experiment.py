"""The experiment runner end to end on a tiny configuration: stages, caching, resume, results files."""

from __future__ import annotations

import csv
import functools
import importlib
import json
from pathlib import Path

import pytest

from edm_lightning.attacks import ATTACKS
from edm_lightning.errors import ConfigError
from edm_lightning.experiment import (
    AttackConfig,
    BenignCorruption,
    DefenseConfig,
    DetectorSetup,
    EDMConfig,
    ExperimentConfig,
    TrainConfig,
    run_experiment,
)
from edm_lightning.experiment.__main__ import main as experiment_main
from edm_lightning.experiment.validation import validate
from tests.helpers.experiment import tiny_config

jobs = importlib.import_module("edm_lightning.experiment.jobs")
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_runs_every_stage_and_writes_the_measured_values(fake_root: Path, tmp_path: Path, capsys):
    records = run_experiment(tiny_config(fake_root, tmp_path))
    # 2 budgets x (none, edm-neural, edm-keyed) + 1 trade-off point (lambda=0 behind the neural router)
    assert len(records) == 7
    assert {r["defense"] for r in records} == {"none", "edm-neural", "edm-keyed"}
    assert all(r["queries"] <= r["budget"] for r in records)
    out = tmp_path / "results/tiny"
    for name in ("results.md", "results.csv", "records.csv", "budget_curve.png", "tradeoff.png"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = {row["defense"]: row for row in csv.DictReader(f)}
    edm = [r for r in records if r["defense"] == "edm-neural" and r["budget"] == 128 and r["diversity_weight"] == 0.5][0]
    assert float(rows["edm-neural"]["clone_acc_mean"]) == pytest.approx(edm["clone_acc"])
    assert "clone_acc_drop_mean" in rows["edm-keyed"]
    with open(out / "records.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    log = capsys.readouterr().err
    assert "[1/" in log and "running" in log and "done in" in log
    # each EDM row's defender accuracy is the ensemble measured behind that row's router
    served = {}
    for folder in (tmp_path / "runs/tiny").glob("served-*"):
        router = json.loads((folder / "config.json").read_text())["router"]
        served.setdefault(router, set()).add(json.loads((folder / "result.json").read_text())["test_acc"])
    for router in ("neural", "keyed"):
        assert {r["defender_acc"] for r in records if r["defense"] == f"edm-{router}"} <= served[router]


def test_a_second_run_trains_nothing_and_spends_no_query(fake_root: Path, tmp_path: Path, monkeypatch, capsys):
    config = tiny_config(fake_root, tmp_path)
    first = run_experiment(config)
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr("edm_lightning.experiment.cli_jobs.run_job", must_not_run)
    monkeypatch.setattr(jobs, "attack", must_not_run)  # the attack stages' work (validation builds their parts alone)
    assert run_experiment(config) == first
    log = capsys.readouterr().err
    assert log.count(": cached (") == 17 and ": running" not in log


def test_a_killed_run_resumes_and_leaves_no_results_behind(fake_root: Path, tmp_path: Path, monkeypatch, capsys):
    real = jobs.attack
    calls = {"n": 0}

    def killed_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "attack", killed_on_third)  # the third attack stage is killed
    config = tiny_config(fake_root, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config)
    assert not (tmp_path / "results/tiny/results.md").exists()
    capsys.readouterr()
    monkeypatch.setattr(jobs, "attack", real)
    run_experiment(config)
    log = capsys.readouterr().err
    assert log.count(": running") == 5  # the killed attack and the four after it; everything before is cached
    assert (tmp_path / "results/tiny/results.md").is_file()


def test_bad_input_fails_before_training(fake_root: Path, tmp_path: Path):
    attacks = [AttackConfig(name="knockoff", budgets=[10], options={"batch_size": 32})]
    bad_budget = tiny_config(fake_root, tmp_path, attacks=attacks)
    with pytest.raises(ConfigError, match="smaller than one query batch"):
        run_experiment(bad_budget)
    with pytest.raises(ConfigError, match="Unknown dataset"):
        run_experiment(tiny_config(fake_root, tmp_path, dataset="fashion"))
    with pytest.raises(ConfigError, match="must not be the victim's own dataset"):
        run_experiment(tiny_config(fake_root, tmp_path, attacks=[AttackConfig(surrogate="fashionmnist", budgets=[128])]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.edm, "diversity_weight", -1.0), "must be a finite number >= 0"),
    (lambda c: setattr(c.edm, "num_members", 1), "num_members must be an integer >= 2"),
    (lambda c: setattr(c.edm, "arch", "foo"), "edm: Unknown architecture 'foo'"),
    (lambda c: setattr(c.attacks[0], "arch", "bar"), "attack knockoff: Unknown architecture 'bar'"),
    (lambda c: setattr(c.attacks[0], "surrogate", "kmnist"), "python -m edm_lightning.data fetch kmnist"),
    (lambda c: c.attacks[0].options.update(query_copie=4), r"options \['query_copie'\] are not arguments"),
    (lambda c: c.attacks[0].options.update(budget=10), r"options \['budget'\] .* set by the experiment"),
    (lambda c: c.edm.model.update(temprature=2.0), r"edm.model: \['temprature'\] are not EnsembleModule arguments.*temperature"),
    (lambda c: c.target.trainer.update(max_epochs=3), r"target.trainer: \['max_epochs'\] .* set by the experiment"),
    (lambda c: c.hashnet.trainer.update(strategy="ddp"), r"hashnet.trainer: \['strategy'\] .* set by the experiment"),
    (lambda c: c.edm.data.update(dataset="mnist"), r"edm.data: \['dataset'\] .* set by the experiment"),
    (lambda c: setattr(c.target, "model", [1]), "target.model must be a mapping of ClassifierModule arguments"),
    # values of the wrong type, found by the classes' own type hints (the job would refuse them after training)
    (lambda c: c.edm.model.update(temperature="hot"), r"edm.model.temperature: Expected a <class 'float'>"),
    (lambda c: c.edm.data.update(ood_batch_size=1.5), r"edm.data.ood_batch_size: .*Given value: 1.5"),
    (lambda c: c.target.trainer.update(gradient_clip_val="big"), r"target.trainer.gradient_clip_val: .*Given value: big"),
    (lambda c: c.attacks[0].options.update(query_copies="many"), r"knockoff: options.query_copies: Expected a <class 'int'>"),
    (lambda c: c.attacks[0].options.update(strategy="smart"), r"knockoff: options.strategy: Expected a typing.Literal"),
    (lambda c: c.defenses.append(DefenseConfig("rs", "ReverseSigmoid", "beta", [0.5], options={"gamma": "strong"})),
     r"defense 'rs': options.gamma: Expected a <class 'float'>"),
    (lambda c: c.defenses.append(DefenseConfig("rs", "ReverseSigmoid", "beta", [0.5], options={"gama": 1.0})),
     r"defense 'rs': options: \['gama'\] are not arguments of ReverseSigmoid it may set; it may set: gamma$"),
    (lambda c: c.edm.model.update(temperature=None), r"edm.model.temperature: Expected a <class 'float'>. Got value: None"),
    (lambda c: c.attacks[0].options.update(copy_noise=None), r"options.copy_noise: Expected a <class 'float'>"),
    # values a stage's own classes refuse, refused now by the same checks (not after the victims have trained)
    (lambda c: c.attacks[0].options.update(copy_shift=9), r"knockoff \(budget 64\): copy_shift must be an integer in \[0, 8\]"),
    (lambda c: c.attacks[0].options.update(query_copies=100), r"budget=64 cannot buy one image sent as query_copies=100"),
    (lambda c: c.attacks[0].options.update(policy_lr=0.0), r"knockoff \(budget 64\): diversity_window and policy_lr"),
    (lambda c: c.attacks[0].options.update(query_batch_size=0), r"knockoff \(budget 64\): query_batch_size must be a positive"),
    (lambda c: c.attacks[0].options.update(clone_heads=0), r"knockoff \(budget 64\): clone_heads must be a whole number"),
    (lambda c: c.attacks.append(AttackConfig("dfme", budgets=[2048], options={"steps_per_epoch": 0})),
     r"attack dfme \(budget 2048\): steps_per_epoch must be positive"),
    (lambda c: c.attacks.append(AttackConfig("maze", budgets=[2048], options={"replay_size": 0})),
     r"attack maze \(budget 2048\): .*replay_size >= 1"),
    (lambda c: c.attacks.append(AttackConfig("jbda", budgets=[100, 2048], options={"seed_size": 150, "batch_size": 32})),
     r"attack jbda \(budget 100\): seed_size=150 exceeds the budget=100"),
    (lambda c: setattr(c.target, "batch_size", 0), "target: batch_size must be a positive integer"),
    (lambda c: setattr(c.hashnet, "val_size", -1), "hashnet: val_size must be a whole number >= 0"),
    (lambda c: setattr(c, "test_size", 0), "test_size must be a positive integer, got 0"),
    (lambda c: c.edm.model.update(temperature=0.0), "edm: temperature must be a finite number > 0"),
    (lambda c: c.edm.model.update(temperature=float("nan")), r"edm\.model\.temperature is NaN; no setting takes NaN"),
    (lambda c: setattr(c.edm, "diversity_weight", float("inf")), r"diversity_weight \(lambda\) must be a finite number"),
    (lambda c: setattr(c.edm, "routers", ["neural", {"class_path": "coarse", "init_args": {"grid": 0}}]),
     r"edm.routers: coarse\(grid=0\): grid must be >= 1"),
    (lambda c: setattr(c, "seeds", [-1]), r"seeds must be whole numbers in \[0, 4294967295\]"),
    (lambda c: c.attacks[0].options.update(policy_lr=float("nan")), r"attacks\[0\]\.options\.policy_lr is NaN"),
    (lambda c: setattr(c.target, "train_size", 10**8), "target: train_size=100000000 asks for more training images"),
    (lambda c: setattr(c.hashnet, "val_size", 10**8), "hashnet: val_size=100000000 leaves no training images"),
    (lambda c: c.edm.data.update(ood_batch_size=0), "ood_batch_size must be a positive integer"),
    (lambda c: setattr(c, "benign_corruption", BenignCorruption(noise=1.5)), r"benign_corruption.noise must be in \[0, 1\]"),
    (lambda c: setattr(c, "benign_corruption", BenignCorruption(shift=9)), r"benign_corruption.shift must be an integer"),
    (lambda c: setattr(c, "benign_corruption", BenignCorruption(noise=0.1, seed=-1)), r"benign_corruption.seed must be"),
], ids=["negative-lambda", "one-member", "edm-arch", "attack-arch", "surrogate-not-fetched", "misspelt-option",
        "experiment-set-option", "misspelt-model-argument", "experiment-set-trainer-argument", "ddp-in-a-stage",
        "experiment-set-data-argument", "section-not-a-mapping", "model-value-type", "data-value-type",
        "trainer-value-type", "forwarded-option-type", "entry-option-type", "defense-option-type",
        "misspelt-defense-option", "null-for-a-float", "null-option", "copy-shift-too-large", "copies-past-the-budget",
        "zero-policy-lr", "zero-query-batch", "zero-clone-heads", "dfme-zero-steps", "maze-zero-replay-size",
        "jbda-seed-set-past-a-budget", "zero-batch-size", "negative-val-size", "zero-test-size", "zero-temperature",
        "nan-temperature", "infinite-lambda", "coarse-grid-zero", "negative-seed",
        "nan-policy-lr", "train-size-past-the-split", "val-size-past-the-split", "zero-ood-batch",
        "corruption-noise", "corruption-shift", "corruption-seed"])
def test_every_mistake_fails_before_the_first_stage(fake_root: Path, tmp_path: Path, change, message):
    """Not after the target and the hash network (or all training) as before: nothing may run."""
    config = tiny_config(fake_root, tmp_path)
    change(config)
    with pytest.raises(Exception, match=message):
        run_experiment(config)
    assert not (tmp_path / "runs").exists()


def test_a_stage_takes_any_argument_of_its_job_classes_and_only_then_changes_its_key(fake_root: Path, tmp_path: Path):
    """The pass-through sections reach the stage's config.yaml by the classes' own names; unset, they leave every stage
    key as it was (so earlier results stay reused); set, they rerun what they change."""
    import yaml

    from edm_lightning.experiment.plan import build_plan

    plain = tiny_config(fake_root, tmp_path)
    config = tiny_config(fake_root, tmp_path)
    config.edm.model, config.edm.data = {"temperature": 2.0}, {"ood_batch_size": 16}
    config.target.trainer = {"gradient_clip_val": 1.0}
    before, after = ({s.kind: s.id for s in build_plan(c).stages} for c in (plain, config))
    assert before["hashnet"] == after["hashnet"] and before["edm"] != after["edm"] and before["target"] != after["target"]
    run_experiment(config)
    runs = tmp_path / "runs/tiny"
    edm = yaml.safe_load((runs / after["edm"] / "config.yaml").read_text())
    target = yaml.safe_load((runs / after["target"] / "config.yaml").read_text())
    assert edm["model"]["init_args"]["temperature"] == 2.0 and edm["data"]["init_args"]["ood_batch_size"] == 16
    assert target["trainer"]["gradient_clip_val"] == 1.0 and target["trainer"]["max_epochs"] == 1


def test_each_victim_is_also_measured_on_mildly_corrupted_test_images_and_the_clean_stages_stay(fake_root: Path,
                                                                                                tmp_path: Path):
    import yaml

    from edm_lightning.experiment import build_plan

    averaging = AttackConfig(name="knockoff", label="knockoff-avg4", budgets=[64], epochs=1,
                             options={"batch_size": 32, "query_copies": 4})
    plain = tiny_config(fake_root, tmp_path)
    config = tiny_config(fake_root, tmp_path, benign_corruption=BenignCorruption(noise=0.3, shift=3, seed=5))
    plain.attacks.append(averaging)
    config.attacks.append(averaging)
    before, after = ({s.id: s for s in build_plan(c).stages} for c in (plain, config))
    added = [after[i] for i in set(after) - set(before)]
    assert set(before) < set(after)  # every stage of a run without the option keeps its folder
    # one more served stage per victim: the target, and each ensemble (lambda 0.5 and 0) behind each router
    assert sorted((s.kind, s.key["router"]) for s in added) == [
        ("served", "fixed"), ("served", "keyed"), ("served", "keyed"), ("served", "neural"), ("served", "neural")]
    assert all(s.key["benign_corruption"] == {"noise": 0.3, "shift": 3, "seed": 5} for s in added)

    records = run_experiment(config)
    runs, out = tmp_path / "runs/tiny", tmp_path / "results/tiny"
    for stage in added:
        module = yaml.safe_load((runs / stage.id / "config.yaml").read_text())["model"]["init_args"]
        assert (module["noise"], module["shift"], module["seed"]) == (0.3, 3, 5)  # what main.py test reruns
    assert len(records) == 7 + 3  # the tiny run's 7, and the averaging attack against the target and each router
    victims = build_plan(config).victims
    for record in records:  # each record carries its own victim's figure
        stage = victims[(record["defense"], record["diversity_weight"], record["strength"], record["seed"])]["corrupted"]
        assert record["defender_acc_corrupted"] == json.loads((runs / stage / "result.json").read_text())["test_acc"]
    assert "defender acc, corrupted (%)" in (out / "results.md").read_text()
    strongest = list(csv.DictReader((out / "strongest.csv").open()))
    assert strongest and all(0 <= float(row["defender_acc_corrupted_mean"]) <= 1 for row in strongest)


def test_every_victim_kind_gets_its_corrupted_stage_and_a_detector_shares_its_bases(fake_root: Path, tmp_path: Path):
    """Defenses (Adaptive Misinformation's model included) and detectors: planned only, nothing runs."""
    from edm_lightning.experiment import build_plan

    config = defended_config(fake_root, tmp_path, benign_corruption=BenignCorruption(noise=0.02, shift=1))
    config.detectors = [DetectorSetup(name="prada", defends=["none", "edm-neural"], benign_clients=2, benign_queries=40)]
    plan = build_plan(config)
    stages = {stage.id: stage for stage in plan.stages}
    for key, victim in plan.victims.items():
        corrupted = stages[victim["corrupted"]]
        assert corrupted.kind == "served" and corrupted.key["benign_corruption"]["noise"] == 0.02, key
        assert victim["served"] in corrupted.needs or victim["served"] == victim["trained"], key
    watched = {key: victim for key, victim in plan.victims.items() if key[0] in ("prada", "edm-neural+prada")}
    assert len(watched) == 2
    for (label, weight, _, seed), victim in watched.items():
        base = plan.victims[("none" if label == "prada" else "edm-neural", weight, None, seed)]
        assert victim["corrupted"] == base["corrupted"]
    misinformed = [v for k, v in plan.victims.items() if k[0].endswith("adaptive-misinformation")]
    assert misinformed and all(any(n.startswith("misinformation-") for n in stages[v["served"]].needs) for v in misinformed)


def defended_config(root: Path, out: Path, **overrides) -> ExperimentConfig:
    """The tiny experiment with two defenses (one composed with EDM) and a query-averaging attack."""
    averaging = AttackConfig(name="knockoff", label="knockoff-avg4", budgets=[128], epochs=1,
                           options={"batch_size": 32, "query_copies": 4, "copy_noise": 0.01, "copy_shift": 1})
    config = tiny_config(root, out, misinformation=TrainConfig(epochs=1, batch_size=32, val_size=40), **overrides)
    config.attacks = [AttackConfig(name="knockoff", budgets=[128], epochs=1, options={"batch_size": 32}), averaging]
    config.defenses = [
        DefenseConfig(name="reverse-sigmoid", postprocessor="ReverseSigmoid", strength="beta", values=[0.2, 0.9],
                    options={"gamma": 0.5}, defends=["none", "edm-neural"]),
        DefenseConfig(name="adaptive-misinformation", postprocessor="AdaptiveMisinformation", strength="tau", values=[0.9],
                    options={"nu": 1000.0}, defends=["edm-keyed"], attacks=["knockoff", "knockoff-avg4"]),
    ]
    return config


def test_defenses_are_served_attacked_and_reported_per_strength(fake_root: Path, tmp_path: Path):
    records = run_experiment(defended_config(fake_root, tmp_path))
    by = {(r["attack"], r["defense"], r["strength"]): r for r in records}
    # reverse sigmoid: 2 strengths alone and on EDM, under the first attack only (its default)
    for defense in ("reverse-sigmoid", "edm-neural+reverse-sigmoid"):
        assert {s for a, d, s in by if a == "knockoff" and d == defense} == {0.2, 0.9}
        assert not any(a == "knockoff-avg4" and d == defense for a, d, s in by)
    assert ("knockoff-avg4", "edm-keyed+adaptive-misinformation", 0.9) in by
    assert by[("knockoff", "edm-neural+reverse-sigmoid", 0.9)]["diversity_weight"] == 0.5
    assert by[("knockoff", "reverse-sigmoid", 0.2)]["diversity_weight"] is None
    # the averaging attack spent exactly its budget: 32 images x 4 copies
    assert all(r["queries"] == 128 for r in records if r["attack"] == "knockoff-avg4")

    runs = tmp_path / "runs/tiny"
    served = [json.loads((f / "config.json").read_text()) | json.loads((f / "result.json").read_text())
              for f in runs.glob("served-*")]
    strong = [s for s in served if s.get("postprocessors", [{}])[0].get("init_args", {}).get("beta") == 0.9]
    assert {s["router"] for s in strong} == {"fixed", "neural"}
    target = [s for s in strong if s["router"] == "fixed"][0]
    assert by[("knockoff", "reverse-sigmoid", 0.9)]["defender_acc"] == target["test_acc"]
    # Adaptive Misinformation got the experiment's own misinformation model
    misinformation, = runs.glob("misinformation-*")
    am = [s for s in served if s.get("postprocessors", [{}])[0].get("class_path") == "AdaptiveMisinformation"][0]
    assert am["postprocessors"][0]["init_args"]["misinformation_model"] == str(misinformation / "best.ckpt")
    attacked = [json.loads((f / "config.json").read_text()) for f in runs.glob("attack-*")]
    assert sum("postprocessors" in a for a in attacked) == 2 + 2 + 2  # RS alone, RS on EDM, AM x 2 attacks

    out = tmp_path / "results/tiny"
    text = (out / "results.md").read_text()
    assert "| knockoff | edm-neural+reverse-sigmoid | lambda=0.5, beta=0.9 |" in text
    assert "| knockoff-avg4 | edm-keyed+adaptive-misinformation | lambda=0.5, tau=0.9 |" in text
    undefended = by[("knockoff", "none", None)]["defender_acc"]
    within = [r for r in records if r["attack"] == "knockoff" and r["defense"] != "none"
              and undefended - r["defender_acc"] <= 0.01]
    assert ("knockoff: at most 1 point of defender accuracy lost" in text) == bool(within)
    assert "K=4 copies" in text and "extra per image" in text
    spread = {json.loads((f / "config.json").read_text())["router"]: json.loads((f / "result.json").read_text())
              for f in runs.glob("spread-*")}
    assert set(spread) == {"neural", "keyed"}
    for result in spread.values():
        assert 1 <= result["distinct_members"] <= 2 and 0 <= result["share_on_plain_member"] <= 1  # N=2 members
        assert f"reach {result['distinct_members']:.2f} distinct members" in text
    for name in ("tradeoff.png", "tradeoff_knockoff-avg4.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # each victim both attacks ran against, judged by the stronger of the two
    assert "## Each victim against its strongest attack" in text
    strongest = {row["defense"]: row for row in csv.DictReader((out / "strongest.csv").open())}
    assert set(strongest) == {"none", "edm-neural", "edm-keyed", "edm-keyed+adaptive-misinformation"}
    for defense, row in strongest.items():
        clones = {r["attack"]: r["clone_acc"] for r in records if r["defense"] == defense
                  and r["diversity_weight"] in (None, 0.5) and r["strength"] in (None, 0.9)}  # the main lambda only
        assert set(clones) == {"knockoff", "knockoff-avg4"}
        assert row["strongest"] == max(clones, key=clones.get) and float(row["clone_acc_mean"]) == max(clones.values())
        assert f"| {defense} | " in text.split("## Every attack against every victim")[0]


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.defenses[0], "postprocessor", "ReverseSigmoidd"), "unknown post-processor 'ReverseSigmoidd'"),
    (lambda c: setattr(c.defenses[0], "values", [-1.0]), r"beta \(strength\) must be a finite number >= 0"),
    (lambda c: setattr(c.defenses[1], "values", [1.5]), r"tau .* must be in \[0, 1\]"),
    (lambda c: setattr(c.defenses[0], "defends", ["edm-hash"]), "defends must name what it is applied to"),
    (lambda c: setattr(c.defenses[1], "attacks", ["knockoff-avg8"]), "must be labels of configured attacks"),
    (lambda c: setattr(c.attacks[1], "label", None), "attacks must have distinct labels"),
    (lambda c: setattr(c.defenses[1], "name", "reverse-sigmoid"), "defenses must have distinct names"),
    (lambda c: setattr(c.defenses[0], "strength", None), "need a strength"),
    (lambda c: c.defenses[0].options.update(beta=0.1), "swept by values"),
])
def test_bad_defense_settings_fail_before_training(fake_root: Path, tmp_path: Path, change, message):
    config = defended_config(fake_root, tmp_path)
    change(config)
    with pytest.raises(ConfigError, match=message):
        run_experiment(config)
    assert not (tmp_path / "runs").exists()


def test_surrogate_equal_to_the_defenders_ood_set_is_flagged_loudly(fake_root: Path, tmp_path: Path, capsys):
    config = tiny_config(fake_root, tmp_path, attacks=[AttackConfig(surrogate="animal-mnist", budgets=[128])])
    with pytest.warns(UserWarning, match="makes the defense look better than it is"):
        validate(config)
    assert "WARNING" in capsys.readouterr().err


def test_command_line_reports_config_errors_without_traceback(tmp_path: Path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("dataset: fashion\nwandb_project: null\n")
    with pytest.raises(SystemExit) as exit_info:
        experiment_main(["--config", str(config), "--runs_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown dataset 'fashion'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # an option the schema lacks: the error, not a page of usage
        experiment_main(["--config", str(config), "--trainer.foo", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("error: unrecognized arguments: --trainer.foo 1") and len(err.splitlines()) <= 4, err


def test_committed_experiment_configs_parse(capsys):
    from jsonargparse import auto_cli

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/experiment/*.yaml")):
        config = auto_cli(ExperimentConfig, args=["--config", str(path)])
        validate(config, check_data=False)  # CIFAR-10 / EMNIST are not fetched on an offline machine
        assert config.attacks and config.seeds


def test_results_table_and_plots_go_to_wandb(fake_root: Path, tmp_path: Path, monkeypatch):
    """Every stage is a W&B run in the experiment's group; the experiment's own run gets the results table and the
    PNG plots (the logger's calls recorded)."""
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tables, job_types, groups, logged = [], [], [], []
    original_init = WandbLogger.__init__

    @functools.wraps(original_init)  # its signature: the stages' configs name WandbLogger's arguments
    def recording_init(self, *args, **kwargs):
        job_types.append(kwargs.get("job_type"))
        groups.append(kwargs.get("group"))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(WandbLogger, "__init__", recording_init)
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, key, columns, data: tables.append((key, columns, data)))
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images: logged.append(key))

    config = tiny_config(fake_root, tmp_path, wandb_project="edm-lightning-test")
    run_experiment(config)
    (key, columns, data), = tables
    assert key == "results" and "clone_acc_mean" in columns and len(data) == 3
    assert set(logged) == {"budget_curve", "tradeoff", "routing_shares", "coherence"}
    # one run per stage, measurement stages included, all in the experiment's group
    assert set(job_types) == {"target", "hashnet", "ensemble", "served", "diagnostics", "attack", "experiment"}
    assert job_types.count("attack") == 7 and set(groups) == {"tiny"}


def test_the_default_config_plans_exactly_the_main_question():
    """The quick start: target, hash network, one EDM ensemble served behind both routers, KnockoffNets at three
    budgets against each of the three victims; nothing else (the rest is fashionmnist_full_cpu.yaml's)."""
    from jsonargparse import auto_cli

    from edm_lightning.experiment import build_plan

    config = auto_cli(ExperimentConfig, args=["--config", str(REPO_ROOT / "configs/experiment/fashionmnist.yaml")])
    plan = build_plan(config)
    kinds = [stage.kind for stage in plan.stages]
    assert kinds == ["target", "hashnet", "edm", "served", "served", "diagnostics", "diagnostics"] + ["attack"] * 9
    attacks = [(info["defense"], info["budget"]) for _, info in plan.attack_runs]
    assert sorted(attacks) == sorted((d, b) for d in ("none", "edm-neural", "edm-keyed") for b in (5000, 20000, 50000))
    assert all(info["attack"] == "knockoff" for _, info in plan.attack_runs)
    # every stage after the first two reads something earlier in the plan
    position = {stage.id: k for k, stage in enumerate(plan.stages)}
    for k, stage in enumerate(plan.stages):
        assert all(position[need] < k for need in stage.needs)
    assert plan["edm-" + plan.stages[2].id.split("-", 1)[1]].needs == (plan.stages[1].id,)  # EDM needs the hash net
    # each budget of a curve follows the next smaller one, which buys the first part of their shared transfer set
    by_victim: dict[str, list[tuple[int, str]]] = {}
    for stage_id, info in plan.attack_runs:
        by_victim.setdefault(info["defense"], []).append((info["budget"], stage_id))
    for curve in by_victim.values():
        (_, smallest), *larger = sorted(curve)
        assert not any(need.startswith("attack-") for need in plan[smallest].needs)
        assert [plan[bigger].needs[-1] for _, bigger in larger] == [smaller for _, smaller in sorted(curve)[:-1]]


#: The main job's stage folders, as the README's table was measured with. A refactoring must not change them
#: (a finished user's run would train and buy everything again); a deliberate change re-measures the README.
MAIN_JOB_STAGES = [
    "attack-6a6031e2cfb2", "attack-997e0b3270a3", "attack-a328c74851ad", "attack-a8f0d5321e39", "attack-c122684229a2",
    "attack-ec00ab7ae89e", "attack-f2807869e584", "attack-f2c57f6b0417", "attack-f5b8c2e362ca",
    "diagnostics-4e793539c5a5", "diagnostics-7faf22ca625f", "edm-74f640c85ee1", "hashnet-e2fad736a6ff",
    "served-16f9f37f1119", "served-4aa55f35f282", "target-b4f490e37ae2",
]


def test_the_main_jobs_stage_keys_stay_those_of_its_committed_results():
    from jsonargparse import auto_cli

    from edm_lightning.experiment import build_plan

    config = auto_cli(ExperimentConfig, args=["--config", str(REPO_ROOT / "configs/experiment/fashionmnist.yaml")])
    assert sorted(stage.id for stage in build_plan(config).stages) == MAIN_JOB_STAGES


def test_the_full_cpu_config_holds_everything_the_default_left_out():
    from jsonargparse import auto_cli

    from edm_lightning.experiment import build_plan

    default, full = (build_plan(auto_cli(ExperimentConfig, args=["--config", str(REPO_ROOT / f"configs/experiment/{n}.yaml")]))
                     for n in ("fashionmnist", "fashionmnist_full_cpu"))
    assert {s.id for s in default.stages} < {s.id for s in full.stages}  # the default's stages are reused, not redone
    attacks = {info["attack"] for _, info in full.attack_runs}
    assert {"knockoff", "jbda_tr", "dfme", "maze", "disguide", "knockoff-avg8-noise", "knockoff-avg8-shift"} <= attacks
    assert {"misinformation", "spread"} <= {s.kind for s in full.stages}
    assert any(info["diversity_weight"] == 0.0 for _, info in full.attack_runs)  # the control ensemble


def test_a_stages_config_yaml_reproduces_it_through_main_py(fake_root: Path, tmp_path: Path, monkeypatch):
    """Training and attack stages are LightningCLI jobs: ``python main.py fit --config <stage>/config.yaml`` trains
    the same weights again, and ``main.py test`` on them gives the figures of the stage's ``result.json``; a served
    stage and a diagnostics stage are ``main.py test`` jobs. The router key is in no config.yaml; the job reads it
    from the environment, as the file's header says."""
    import subprocess
    import sys

    import torch

    from edm_lightning.cli import main as cli_main

    key = "the-router-key-of-this-test"
    config = tiny_config(fake_root, tmp_path)
    config.edm.router_key = key
    config.edm.routers = ["keyed", "neural"]  # the ensemble's validation routes with the key too
    config.wandb_project = "edm-lightning-test"  # W&B's save_dir is where a re-run writes its config.yaml
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_experiment(config)
    runs = tmp_path / "runs/tiny"
    assert all(key not in path.read_text() for path in runs.rglob("config.yaml"))

    def stage(kind: str, **match) -> Path:
        return next(folder for folder in sorted(runs.glob(f"{kind}-*"))
                    if match.items() <= json.loads((folder / "config.json").read_text()).items())

    def weights(path: Path) -> dict:
        return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]

    def files(folder: Path) -> dict:
        return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in folder.rglob("*") if path.is_file()}

    checked = {  # stage folder -> (checkpoint it tests, {test metric: result.json figure})
        stage("target"): ("best.ckpt", {"test/acc": "test_acc"}),
        stage("edm", diversity_weight=0.5): ("best.ckpt", {"test/acc": "test_acc", "test/id/coherence": "id/coherence"}),
        stage("attack", router="keyed", budget=128): ("last.ckpt", {"test/acc": "clone_acc", "test/agreement": "agreement"}),
    }
    recipe = "--trainer.default_root_dir DIR --trainer.callbacks.dirpath DIR --trainer.logger.save_dir DIR"
    monkeypatch.setenv("EDM_ROUTER_KEY", key)
    for folder, (checkpoint, figures) in checked.items():
        result, before = json.loads((folder / "result.json").read_text()), weights(folder / checkpoint)
        header = (folder / "config.yaml").read_text()
        assert header.startswith("# One stage of the experiment 'tiny'")
        assert recipe in header
        stage_files = files(folder)
        again = tmp_path / "again" / folder.name  # the header's recipe for a re-run that leaves the experiment alone
        refit = subprocess.run([sys.executable, "main.py", "fit", "--config", str(folder / "config.yaml"),
                                *recipe.replace("DIR", str(again)).split()],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert refit.returncode == 0, refit.stderr[-3000:]
        assert files(folder) == stage_files  # not a file of the stage written
        assert (again / "config.yaml").is_file() and (again / checkpoint).is_file()
        after = weights(again / checkpoint)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), folder.name
        tested = cli_main(["test", "--config", str(folder / "config.yaml"), "--ckpt_path", str(again / checkpoint)])
        metrics = {k.split("/dataloader_idx")[0]: float(v) for k, v in tested.trainer.callback_metrics.items()}
        assert {m: pytest.approx(metrics[m], abs=1e-6) for m in figures} == {m: result[f] for m, f in figures.items()}
    served = stage("served", router="keyed")  # a test-only job: the defender's accuracy behind the keyed router
    assert "main.py test --config" in (served / "config.yaml").read_text().splitlines()[1]
    tested = cli_main(["test", "--config", str(served / "config.yaml")])
    assert tested.model.tested_accuracy == json.loads((served / "result.json").read_text())["test_acc"]
    diagnosed = stage("diagnostics", router="neural")  # members' shares and coherence histograms
    figures = json.loads((diagnosed / "result.json").read_text())
    assert cli_main(["test", "--config", str(diagnosed / "config.yaml")]).model.figures == \
        {k: v for k, v in figures.items() if k != "stage_wall_time_s"}
    assert (served / "config.yaml").read_text().startswith("# One stage")  # a test run leaves the stage's file as it was
    monkeypatch.delenv("EDM_ROUTER_KEY")  # without the experiment's key a keyed stage is refused, not routed otherwise
    for refused_run in (["test", "--config", str(served / "config.yaml")],
                        ["fit", "--config", str(stage("edm", diversity_weight=0.5) / "config.yaml"),
                         *recipe.replace("DIR", str(tmp_path / "refused")).split()]):
        with pytest.raises(SystemExit) as refused:
            cli_main(refused_run)
        assert refused.value.code == 2, refused_run[:2]
    assert not (tmp_path / "refused").exists()


def test_the_eta_counts_a_shared_shadow_kit_once_per_seed_and_a_synthesis_ensemble_as_more_work(fake_root: Path,
                                                                                                  tmp_path: Path):
    """The ETA starts from the plan's estimates: D-DAE's shadow kit is trained once per seed and kit settings and
    reused by every victim (and by D-DAE told the defense), so one stage per kit carries it; the headline's synthesis
    ensemble does 2.2 times the paper's work per step."""
    from edm_lightning.attacks.ddae import ddae_kit_cost
    from edm_lightning.experiment import build_plan
    from edm_lightning.experiment.plan import _STAGE_S
    from edm_lightning.models import Synthesis

    ddae = [AttackConfig(name="ddae", budgets=[64], epochs=1),
            AttackConfig(name="ddae", label="ddae-as-edm", budgets=[64], epochs=1, options={"assume_defense": "EDM"}),
            AttackConfig(name="ddae", label="ddae-share", budgets=[64], epochs=1, options={"share": 0.05})]
    config = tiny_config(fake_root, tmp_path, attacks=ddae, seeds=[0, 1])
    attacks = [stage for stage in build_plan(config).stages if stage.kind == "attack"]
    kit_s = min(ddae_kit_cost(6e-5, {})[1], ddae_kit_cost(6e-5, {"share": 0.05})[1])
    carrying = sorted((stage.key["seed"], stage.key["attack"]["options"].get("share", 0.02))
                      for stage in attacks if stage.estimate_s > kit_s)
    assert carrying == [(0, 0.02), (0, 0.05), (1, 0.02), (1, 0.05)]  # one per seed and kit, whatever the victim
    assert len(attacks) > 3 * len(carrying)

    headline = {"disagree_on": ["jacobian"], "epsilon": 0.1, "steps": 3, "agree_noise": 0.02, "agree_shift": 1}
    assert Synthesis().step_cost(5) == 1.0 and Synthesis(**headline).step_cost(5) == pytest.approx(2.2)
    plain = tiny_config(fake_root, tmp_path)
    config = tiny_config(fake_root, tmp_path)
    config.edm.model = {"synthesis": headline}
    paper, synthesis = ([s.estimate_s for s in build_plan(c).stages if s.kind == "edm"][0] for c in (plain, config))
    fixed = _STAGE_S  # the same fixed cost of a stage, and step_cost times the steps (the tiny ensemble has 2 members)
    assert synthesis - fixed == pytest.approx(Synthesis(**headline).step_cost(2) * (paper - fixed)) and synthesis > paper


def test_dry_run_prints_the_plan_and_runs_nothing(fake_root: Path, tmp_path: Path, capsys):
    config = tiny_config(fake_root, tmp_path, dry_run=True)
    assert run_experiment(config) == []
    out = capsys.readouterr().out  # the plan is the output (`--dry_run true > plan.txt`)
    assert "[1/17] target" in out and "[17/17] attack" in out and "17 stages, 0 already done" in out
    assert not (tmp_path / "runs").exists()
    run_experiment(tiny_config(fake_root, tmp_path))
    capsys.readouterr()
    run_experiment(config)
    assert "17 stages, 17 already done; about 0s of work left" in capsys.readouterr().out


def test_progress_in_a_log_file_is_plain_lines_and_library_chatter_goes_to_the_stage_log(fake_root: Path, tmp_path: Path,
                                                                                          capsys):
    run_experiment(tiny_config(fake_root, tmp_path))
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redrawn in a file
    assert "running ... (elapsed" in err and "ETA" in err
    assert "    epoch 1/1  val/acc" in err  # one line per training epoch
    assert "buying the transfer set: 64/64 queries" in err and "done in" in err
    assert "GPU available" not in err and "TPU available" not in err
    stage_logs = list((tmp_path / "runs/tiny").glob("target-*/stage.log"))
    assert len(stage_logs) == 1 and "GPU available" in stage_logs[0].read_text()


def _stage_results(runs: Path) -> list[str]:
    """Every stage's kind and figures (paths, which name the runs folder, and timings left out), sorted.

    The checkpoints' digests (``outputs``) are left out too: a checkpoint records the folder it was written in.
    ``queries_this_run`` is compared too: the plan runs a KnockoffNets curve's budgets smallest first, so each buys
    the same part of their shared transfer set in any execution.
    """
    left_out = ("stage_wall_time_s", "wall_time_s", "checkpoint", "hash_checkpoint", "outputs")
    return sorted(json.dumps([folder.name.split("-")[0], {k: v for k, v in json.loads((folder / "result.json").read_text())
                                                          .items() if k not in left_out}], sort_keys=True)
                  for folder in runs.iterdir() if (folder / "result.json").is_file())


def test_two_workers_give_the_serial_run_stage_by_stage(fake_root: Path, tmp_path: Path, monkeypatch):
    import torch

    serial, parallel = (tiny_config(fake_root, tmp_path / kind) for kind in ("serial", "parallel"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of 2 workers gets on a 2-core machine, so the figures can match exactly
    try:
        serial_records = run_experiment(serial)
    finally:
        torch.set_num_threads(threads)
    parallel.workers = 2
    parallel.runs_dir = serial.runs_dir.replace("serial", "parallel")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    parallel_records = run_experiment(parallel)
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in serial_records]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in parallel_records]
    serial_stages = _stage_results(tmp_path / "serial/runs/tiny")
    assert len(serial_stages) == 17 and serial_stages == _stage_results(tmp_path / "parallel/runs/tiny")


def test_a_failed_stage_stops_its_dependants_and_the_rest_still_runs(fake_root: Path, tmp_path: Path, monkeypatch, capsys):
    from edm_lightning.experiment.execution import StageFailed

    def broken(*args, **kwargs):
        raise RuntimeError("hash network exploded")

    monkeypatch.setattr(jobs, "train_hashnet", broken)
    with pytest.raises(StageFailed) as failure:
        run_experiment(tiny_config(fake_root, tmp_path))
    message = str(failure.value)
    assert "1 stage(s) failed" in message and "hash network exploded" in message and "stage.log" in message
    assert "run the same command again" in message
    err = capsys.readouterr().err
    # the target and the attacks on it needed no hash network: they ran; everything EDM was skipped
    assert err.count("skipped: a stage it needs failed") == 2 + 4 + 2 + 5  # 2 ensembles, 4 served, 2 diagnostics, 5 attacks
    assert err.count("attack knockoff vs none") == 2 * 2  # running + done, for both budgets
    hashnet_log, = (tmp_path / "runs/tiny").glob("hashnet-*/stage.log")
    assert "RuntimeError: hash network exploded" in hashnet_log.read_text()
    assert not (tmp_path / "results/tiny/results.md").exists()


def test_workers_must_be_a_positive_count(fake_root: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        run_experiment(tiny_config(fake_root, tmp_path, workers=0))
    assert not (tmp_path / "runs").exists()


def test_two_runners_on_one_runs_dir_run_each_stage_once(fake_root: Path, tmp_path: Path):
    """Two experiment processes started together on one config: every stage (and every query) is paid once."""
    import subprocess
    import sys
    from dataclasses import asdict

    import yaml

    config = asdict(tiny_config(fake_root, tmp_path))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "edm_lightning.experiment", "--config", str(path)]
    env = {**__import__("os").environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    runners = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [runner.communicate(timeout=600)[1] for runner in runners]
    assert [runner.returncode for runner in runners] == [0, 0], logs
    stages = len(list((tmp_path / "runs/tiny").glob("*-*/result.json")))
    assert stages == 17
    assert sum(log.count(": done in") for log in logs) == 17  # each stage's work happened in one runner only
    assert sum(log.count(": reused: another runner") + log.count(": cached (") for log in logs) == 17
    # 7 purchases in one run (budgets 64 then 128 against 3 victims, 128 against the lambda=0 ensemble), not 14
    assert sum(log.count("buying the transfer set") for log in logs) == 7


def test_submitit_jobs_give_the_serial_run_stage_by_stage(fake_root: Path, tmp_path: Path, monkeypatch):
    """The SLURM path, one job array per level of the plan, run through submitit's local executor."""
    import torch

    serial, jobs_run = (tiny_config(fake_root, tmp_path / kind) for kind in ("serial", "submitit"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial_records = run_experiment(serial)
    finally:
        torch.set_num_threads(threads)
    jobs_run.executor, jobs_run.workers = "submitit_local", 2
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # 2 jobs at a time, 1 thread each, as the serial run above
    records = run_experiment(jobs_run)
    assert [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records] == \
        [{k: v for k, v in r.items() if k != "wall_time_s"} for r in serial_records]
    assert _stage_results(tmp_path / "serial/runs/tiny") == _stage_results(tmp_path / "submitit/runs/tiny")
    assert any((tmp_path / "submitit/runs/tiny/submitit").rglob("*_result.pkl"))  # the stages ran as submitit jobs


def test_a_slurm_run_needs_a_partition_before_anything_starts(fake_root: Path, tmp_path: Path):
    config = tiny_config(fake_root, tmp_path, executor="slurm")
    with pytest.raises(ConfigError, match="needs cluster.partition"):
        run_experiment(config)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("devices", ["gpu.yaml", "gpu_node.yaml"])
def test_device_configs_compose_with_an_experiment_and_are_checked_against_the_machine(devices: str):
    import torch
    from jsonargparse import auto_cli

    config = auto_cli(ExperimentConfig, args=["--config", str(REPO_ROOT / "configs/experiment/fashionmnist_full.yaml"),
                                              "--config", str(REPO_ROOT / "configs/experiment/devices" / devices)])
    assert config.trainer.accelerator == "gpu" and config.trainer.precision == "bf16-mixed"
    assert config.seeds == [0, 1, 2]  # the experiment's own settings survive the composition
    if torch.cuda.is_available():
        validate(config)
    else:
        with pytest.raises(ConfigError, match="this machine has no such device; use cpu or auto"):
            validate(config)


def test_slurm_without_sbatch_on_the_machine_is_refused_before_anything_starts(fake_root: Path, tmp_path: Path,
                                                                               monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    config = tiny_config(fake_root, tmp_path, executor="slurm")
    config.cluster.partition = "gpu"
    with pytest.raises(ConfigError, match="needs SLURM's sbatch on this machine"):
        run_experiment(config)
    assert not (tmp_path / "runs").exists()


def test_an_unregistered_attack_is_refused_before_the_first_stage_with_the_registered_names(fake_root: Path,
                                                                                            tmp_path: Path):
    config = tiny_config(fake_root, tmp_path, attacks=[AttackConfig(name="copycat", budgets=[128])])
    names = ", ".join(ATTACKS.names())
    with pytest.raises(ConfigError, match=f"Unknown attack 'copycat'. Known attacks: {names}."):
        run_experiment(config)
    assert not (tmp_path / "runs").exists()
    assert {"knockoff", "jbda", "jbda_tr", "dfme", "maze"} <= set(ATTACKS.names())


def test_the_runner_and_the_cli_jobs_share_their_defaults():
    """A setting the experiment schema shares with a job class has the same default in both (#12: lambda was 0.5 here)."""
    import inspect

    from edm_lightning.data import ClassificationDataModule
    from edm_lightning.models import EnsembleModule

    def defaults(cls) -> dict:
        return {name: p.default for name, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}

    for schema, job in ((EDMConfig, EnsembleModule), (TrainConfig, ClassificationDataModule), (TrainConfig, EnsembleModule)):
        shared = defaults(schema).keys() & defaults(job).keys() - {"optim"}
        assert shared, (schema, job)
        assert {k: defaults(schema)[k] for k in shared} == {k: defaults(job)[k] for k in shared}, (schema, job)
