"""The EDM evaluation for one dataset: check the configuration, plan its stages, run them, write the results.

:func:`run_experiment` validates everything it can before any stage starts, builds the plan
(:mod:`.plan`), runs every stage not already done, here, on local workers or as submitit jobs (:mod:`.execution`; a
stage's ``result.json`` is written last and atomically, so a killed run resumes where it stopped), and
writes the results (:mod:`.outputs`) once all stages are done. One line per stage says where the run is:
stage k of N, elapsed time, and an ETA from the plan's estimates rescaled by what this run's stages
really took. What libraries print inside a stage goes to that stage's ``stage.log``.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from edm_lightning.experiment.config import ExperimentConfig
from edm_lightning.experiment.execution import execute
from edm_lightning.experiment.outputs import write_results
from edm_lightning.experiment.plan import Plan, build_plan
from edm_lightning.experiment.stages import StageStore
from edm_lightning.experiment.validation import validate
from edm_lightning.progress import format_seconds
from edm_lightning.tracking import resolve_wandb_mode

__all__ = ["describe_plan", "run_experiment"]


def run_experiment(config: ExperimentConfig, log: IO[str] | None = None) -> list[dict]:
    """Run (or reuse) every stage of ``config``, write the results, and return the attack records.

    With ``config.dry_run`` only print the plan (to standard output) and return ``[]``.

    Returns:
        One record per attack run (what ``records.csv`` holds).

    Raises:
        ConfigError: a configuration that cannot finish, before any stage starts.
        StageFailed: stages failed (after every stage that did not need them ran); no results are written.
    """
    log = log or sys.stderr
    validate(config, log)
    plan = build_plan(config)
    store = StageStore(plan.root)
    if config.dry_run:  # the plan is what was asked for: standard output (progress and logs go to ``log``)
        print(describe_plan(plan, store), flush=True)
        return []
    if config.wandb_project:
        resolve_wandb_mode()
    start = time.perf_counter()
    results = execute(plan, store, log, config.workers, config.executor, config.cluster)
    records = _records(plan, results)
    victims = {key: {**results[v["trained"]], **results[v["served"]], **(results[v["benign"]] if "benign" in v else {})}
               for key, v in plan.victims.items()}
    spreads = {key: [results[stage_id] for stage_id in ids] for key, ids in plan.spreads.items()}
    diagnostics = {router: [results[stage_id] for stage_id in ids] for router, ids in plan.diagnostics.items()}
    compute = sum(result.get("stage_wall_time_s", 0.0) for result in results.values())
    write_results(config, records, victims, spreads, diagnostics, time.perf_counter() - start, compute, log)
    return records


def describe_plan(plan: Plan, store: StageStore) -> str:
    """One line per stage (done or to run, estimated time), and the estimated total of what is left."""
    lines, left, finished = [], 0.0, 0
    for k, stage in enumerate(plan.stages, 1):
        result, problem = store.state(stage.kind, stage.key, **stage.checks)
        done = result is not None
        left += 0.0 if done else stage.estimate_s
        finished += done
        state = "done" if done else f"~{format_seconds(stage.estimate_s)}"
        if problem is not None:
            state += f" (damaged: {problem}; it runs again)"
        lines.append(f"[{k}/{len(plan.stages)}] {stage.kind} {stage.label}: {state}")
    lines.append(f"{len(plan.stages)} stages, {finished} already done; about {format_seconds(left)} of work left "
                 f"(estimates for a 2-core CPU) in {plan.root}")
    return "\n".join(lines)


def _records(plan: Plan, results: dict[str, dict]) -> list[dict]:
    """One record per attack run: where it ran (attack, defense, strength, budget, seed) and what it measured."""
    records = []
    for stage_id, info in plan.attack_runs:
        result = results[stage_id]
        records.append({
            "attack": info["attack"], "answers": info["answers"], "defense": info["defense"],
            "diversity_weight": info["diversity_weight"],
            "strength_name": info["strength_name"], "strength": info["strength"], "budget": info["budget"],
            "seed": info["seed"], "defender_acc": results[info["served"]]["test_acc"], "clone_acc": result["clone_acc"],
            "agreement": result["agreement"], "queries": result["queries"], "wall_time_s": result["wall_time_s"],
            **({"flagged_at": result["flagged_at"]} if "flagged_at" in result else {}),  # behind a detector
            **({"defender_acc_corrupted": results[info["corrupted"]]["test_acc"]} if info["corrupted"] else {}),
        })
    return records
