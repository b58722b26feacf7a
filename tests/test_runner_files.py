"""The runner's own files are read back like input from outside: a finished stage is finished only while what it
produced is whole; a damaged one is named, with what is wrong, and run again."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from edm_lightning.experiment import run_experiment
from edm_lightning.experiment.execution import execute
from edm_lightning.experiment.plan import Plan, Stage
from edm_lightning.experiment.runner import describe_plan
from edm_lightning.experiment.stages import StageStore
from tests.helpers.experiment import tiny_config

OUTPUTS = ("best.ckpt", "last.ckpt")


def train(folder: Path, calls: list) -> dict:
    """A stand-in training stage: writes its two checkpoints, returns its figure."""
    calls.append(folder.name)
    (folder / "best.ckpt").write_bytes(b"best weights")
    (folder / "last.ckpt").write_bytes(b"last weights")
    return {"checkpoint": str(folder / "best.ckpt"), "test_acc": 0.5}


def finished(tmp_path: Path) -> tuple[StageStore, Path, list]:
    store, calls = StageStore(tmp_path), []
    store.run("target", {"seed": 0}, lambda folder: train(folder, calls), outputs=OUTPUTS, figures=("test_acc",))
    return store, store.folder("target", {"seed": 0}), calls


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "result.json").write_text((f / "result.json").read_text()[:25]), "result.json is not readable JSON"),
    (lambda f: (f / "result.json").write_text("[]"), "result.json holds a list, not the stage's figures"),
    (lambda f: (f / "result.json").write_bytes(os.urandom(64) + b"\xff"), "result.json is not readable JSON"),
    (lambda f: (f / "result.json").write_text('{"stage_wall_time_s": 1.0}'), "result.json lacks 'test_acc'"),
    (lambda f: (f / "result.json").write_text('{"stage_wall_time_s": 1.0, "test_acc": NaN}'),
     "result.json's 'test_acc' is nan, not a finite number"),
    (lambda f: (f / "best.ckpt").unlink(), "best.ckpt is missing"),
    (lambda f: (f / "best.ckpt").write_bytes(b"other weights"), "best.ckpt is not the file the stage wrote"),
    (lambda f: ((f / "result.json").unlink(), (f / "result.json").mkdir()), "result.json is not readable JSON"),
], ids=["truncated", "a-list", "binary", "figure-missing", "nan-figure", "checkpoint-deleted", "checkpoint-replaced",
        "a-folder"])
def test_a_damaged_stage_is_named_and_run_again_from_the_start(tmp_path: Path, capsys, damage, problem):
    store, folder, calls = finished(tmp_path)
    damage(folder)
    result, found = store.state("target", {"seed": 0}, OUTPUTS, ("test_acc",))
    assert result is None and found.startswith(problem), found
    assert store.cached("target", {"seed": 0}, OUTPUTS, ("test_acc",)) is None
    (folder / "cache").mkdir()  # what a stage bought is kept for its re-run
    (folder / "cache" / "bought.pt").write_bytes(b"answers")

    def train_again(stage_folder: Path) -> dict:
        assert not (stage_folder / "last.ckpt").exists()  # the re-run trains afresh, never "resumes" a finished fit
        return train(stage_folder, calls)

    again = store.run("target", {"seed": 0}, train_again, outputs=OUTPUTS, figures=("test_acc",))
    assert len(calls) == 2 and again["test_acc"] == 0.5 and (folder / "cache" / "bought.pt").read_bytes() == b"answers"
    assert f"stage {folder.name} is damaged ({problem}" in capsys.readouterr().err
    assert store.state("target", {"seed": 0}, OUTPUTS, ("test_acc",)) == (again, None)


def test_a_result_records_its_outputs_digests_and_one_written_before_them_is_still_reused(tmp_path: Path):
    store, folder, calls = finished(tmp_path)
    recorded = json.loads((folder / "result.json").read_text())["outputs"]
    assert set(recorded) == set(OUTPUTS) and all(len(digest) == 64 for digest in recorded.values())
    earlier = {k: v for k, v in json.loads((folder / "result.json").read_text()).items() if k != "outputs"}
    (folder / "result.json").write_text(json.dumps(earlier))  # as a stage finished by an earlier version
    assert store.run("target", {"seed": 0}, lambda f: train(f, calls), outputs=OUTPUTS, figures=("test_acc",)) == earlier
    assert len(calls) == 1
    (folder / "best.ckpt").write_bytes(b"")  # without a digest, an output must still be there and not empty
    assert store.state("target", {"seed": 0}, OUTPUTS, ("test_acc",))[1] == "best.ckpt is empty"


@pytest.mark.parametrize("figures, outputs, problem", [
    ({"test_acc": float("nan")}, OUTPUTS, "result.json's 'test_acc' is nan"),
    ({"accuracy": 0.5}, OUTPUTS, "result.json lacks 'test_acc'"),
    ({"test_acc": 0.5}, ("best.ckpt",), "it wrote no last.ckpt"),
], ids=["nan-figure", "figure-missing", "output-missing"])
def test_a_result_that_would_be_refused_when_read_back_is_never_written(tmp_path: Path, figures, outputs, problem):
    def work(folder: Path) -> dict:
        for name in outputs:
            (folder / name).write_bytes(b"weights")
        return figures

    store = StageStore(tmp_path)
    with pytest.raises(RuntimeError, match="finished, but its result is not whole") as failure:
        store.run("target", {"seed": 0}, work, outputs=OUTPUTS, figures=("test_acc",))
    assert problem in str(failure.value)
    assert not (store.folder("target", {"seed": 0}) / "result.json").exists()


def test_a_stage_whose_checkpoint_was_deleted_is_trained_again_and_its_dependants_run(tmp_path: Path):
    """Before: best.ckpt deleted, result.json kept: the stage counted as done, every stage that read the checkpoint
    failed, and so did "run the same command again"."""
    calls = []

    def serve(folder: Path, target: Path) -> dict:
        calls.append(folder.name)
        return {"test_acc": 0.5 if (target / "best.ckpt").read_bytes() == b"best weights" else 0.0}

    target = Stage("target", {"seed": 0}, "target (seed 0)", lambda folder: train(folder, calls))
    served = Stage("served", {"ensemble": "target"}, "target served", lambda folder: serve(folder, tmp_path / target.id),
                   needs=(target.id,))
    plan = Plan(tmp_path, [target, served], {}, {}, {}, [])
    store = StageStore(tmp_path)
    execute(plan, store, io.StringIO())
    (tmp_path / target.id / "best.ckpt").unlink()
    (tmp_path / served.id / "result.json").write_text("[]")
    assert "[1/2] target target (seed 0): ~0s (damaged: best.ckpt is missing; it runs again)" in describe_plan(plan, store)
    log = io.StringIO()
    results = execute(plan, store, log)
    lines = log.getvalue().splitlines()
    assert lines[0] == f"[1/2] target target (seed 0): WARNING: damaged (best.ckpt is missing) in {tmp_path / target.id}: " \
                       "it runs again"
    assert lines[1].startswith("[2/2] served target served: WARNING: damaged (result.json holds a list")
    assert calls == [target.id, served.id, target.id, served.id] and results[served.id]["test_acc"] == 0.5
    assert "2 stages, 2 already done" in describe_plan(plan, store)


def test_the_runner_re_runs_the_stages_of_an_experiment_whose_files_were_damaged(fake_root: Path, tmp_path: Path):
    """The issue's examples on a real (tiny) experiment: a result.json truncated, replaced by [] or by binary bytes,
    and the target's best.ckpt and an attack's clone deleted with their result.json kept. The same command finishes,
    naming each damaged stage."""
    config = tiny_config(fake_root, tmp_path)
    first = run_experiment(config, log=io.StringIO())
    runs = tmp_path / "runs/tiny"
    target, = runs.glob("target-*")
    (target / "best.ckpt").unlink()
    attacks = sorted(runs.glob("attack-*"))
    (attacks[0] / "result.json").write_text((attacks[0] / "result.json").read_text()[:30])
    (attacks[1] / "result.json").write_text("[]")
    assert len(attacks) >= 3
    (attacks[2] / "last.ckpt").unlink()  # the clone its config.yaml tests
    served = sorted(runs.glob("served-*"))[0]
    (served / "result.json").write_bytes(os.urandom(64) + b"\xff")
    log = io.StringIO()
    again = run_experiment(config, log=log)
    damaged = [line for line in log.getvalue().splitlines() if "WARNING: damaged" in line]
    assert len(damaged) == 5 and sum("running ..." in line for line in log.getvalue().splitlines()) == 5
    assert any(f"damaged (best.ckpt is missing) in {target}" in line for line in damaged)
    assert any(f"damaged (last.ckpt is missing) in {attacks[2]}" in line for line in damaged)
    assert (target / "best.ckpt").is_file() and "FAILED" not in log.getvalue()
    assert [r["clone_acc"] for r in again] == [r["clone_acc"] for r in first]  # the same seeds, the same figures
    assert (tmp_path / "results/tiny/results.md").is_file()


def test_a_stage_whose_log_cannot_be_written_fails_with_a_message_and_the_others_run(tmp_path: Path):
    from edm_lightning.experiment.execution import StageFailed

    calls = []
    first = Stage("target", {"seed": 0}, "target (seed 0)", lambda folder: train(folder, calls))
    other = Stage("target", {"seed": 1}, "target (seed 1)", lambda folder: train(folder, calls))
    (tmp_path / first.id / "stage.log").mkdir(parents=True)  # a folder where the stage's log goes
    with pytest.raises(StageFailed, match=r"its log cannot be written \(IsADirectoryError") as failure:
        execute(Plan(tmp_path, [first, other], {}, {}, {}, []), StageStore(tmp_path), io.StringIO())
    assert f"remove or free {tmp_path / first.id / 'stage.log'}" in str(failure.value) and calls == [other.id]
