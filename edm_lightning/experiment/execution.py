"""Running a plan: in this process, on K local worker processes, or as submitit jobs (SLURM), as dependencies allow.

Each stage runs at most once across runners: :class:`~.stages.StageStore` holds a lock on the stage's
folder while it runs, so a second runner on the same ``runs_dir`` waits and then reuses the result. A
stage that fails stops the stages that need it; independent stages go on, and the run ends with a summary
of what failed and where its log is (a re-run resumes from there).

Threads: a process on its own keeps PyTorch's default (every core; on a 2-core CPU that measured faster
than one thread), K workers get ``cores // K`` threads each so they never oversubscribe the machine, and
on a GPU machine each worker gets a GPU of its own (more workers than GPUs share them in turn).
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import IO

import torch

from edm_lightning.experiment.config import ClusterConfig
from edm_lightning.experiment.plan import Plan, Stage
from edm_lightning.experiment.stages import StageStore
from edm_lightning.progress import format_seconds, stage_log

__all__ = ["StageFailed", "execute", "worker_threads"]


class StageFailed(RuntimeError):
    """Stages failed (their dependants were skipped); the message lists them and their logs."""


def execute(plan: Plan, store: StageStore, log: IO[str], workers: int = 1, executor: str = "local",
            cluster: ClusterConfig | None = None) -> dict[str, dict]:
    """Run every stage of ``plan`` not already done; each stage's result by stage id.

    Args:
        plan: the stages, dependencies first.
        store: where results are kept.
        log: where the progress lines go.
        workers: stages run at once, each in a process of its own (1: in this process, in plan order);
            :func:`~.validation.validate` has checked it is a positive integer.
        executor: ``local``, or ``slurm`` / ``submitit_local`` (submitit jobs, one array per level).
        cluster: the submitit jobs' resources.

    Returns:
        Stage id -> its result dict, for every stage of the plan.

    Raises:
        StageFailed: after every runnable stage ran, if any failed.
    """
    tracker = _Tracker(plan, store, log)
    if executor != "local":
        _run_submitit(plan, store, tracker, executor, cluster or ClusterConfig(), workers)
    elif workers == 1:
        for stage in plan.stages:
            if tracker.ready(stage):
                tracker.started(stage)
                tracker.finished(stage, *_run_stage(stage, plan.folder(stage), store))
            elif stage.id not in tracker.results:
                tracker.skip(stage)
    else:
        _run_pool(plan, store, tracker, workers)
    tracker.raise_failures()
    return tracker.results


def worker_threads(workers: int, cores: int | None = None) -> int:
    """PyTorch threads per worker: the machine's cores shared out, at least one each."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def _run_pool(plan: Plan, store: StageStore, tracker: _Tracker, workers: int) -> None:
    context = get_context("spawn")  # a fresh interpreter per worker: no inherited threads or CUDA state
    devices = context.Queue()
    gpus = _visible_gpus()
    for index in range(workers):
        devices.put(gpus[index % len(gpus)] if gpus else None)
    pending: dict[Future, Stage] = {}
    waiting = list(plan.stages)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(worker_threads(workers), devices)) as pool:
        while waiting or pending:
            for stage in list(waiting):
                if stage.id in tracker.results:
                    waiting.remove(stage)
                elif tracker.blocked(stage):
                    waiting.remove(stage)
                    tracker.skip(stage)
                elif tracker.ready(stage) and len(pending) < workers:
                    waiting.remove(stage)
                    tracker.started(stage)
                    pending[pool.submit(_run_stage, stage, plan.folder(stage), store)] = stage
            if not pending:
                if waiting:  # cannot happen with a plan whose needs come first; never spin on it
                    raise RuntimeError(f"stages wait on needs that never run: {[s.id for s in waiting]}")
                continue
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                stage = pending.pop(future)
                try:
                    tracker.finished(stage, *future.result())
                except Exception as err:  # the worker itself died (killed for memory) or its result did not pickle
                    tracker.finished(stage, None, False, f"worker failed: {type(err).__name__}: {err}")


def _run_submitit(plan: Plan, store: StageStore, tracker: _Tracker, executor: str, cluster: ClusterConfig,
                  workers: int) -> None:
    """One job array per level of the plan (the stages whose needs are done), waited for before the next."""
    import submitit  # optional: the [cluster] extra (validate() has checked it is installed)

    backend = "slurm" if executor == "slurm" else "local"
    jobs = submitit.AutoExecutor(folder=plan.root / "submitit" / "%j", cluster=backend)
    jobs.update_parameters(timeout_min=cluster.timeout_min, cpus_per_task=cluster.cpus_per_task, mem_gb=cluster.mem_gb,
                           gpus_per_node=cluster.gpus_per_task, tasks_per_node=1, nodes=1,
                           slurm_partition=cluster.partition, slurm_array_parallelism=cluster.array_parallelism,
                           slurm_additional_parameters=dict(cluster.additional))
    threads = cluster.cpus_per_task if backend == "slurm" else worker_threads(workers)
    waiting = [stage for stage in plan.stages if stage.id not in tracker.results]
    while waiting:
        for stage in list(waiting):  # in plan order, so a stage after a skipped one is skipped in the same pass
            if tracker.blocked(stage):
                waiting.remove(stage)
                tracker.skip(stage)
        level = [stage for stage in waiting if tracker.ready(stage)]
        if not level:
            if waiting:
                raise RuntimeError(f"stages wait on needs that never run: {[s.id for s in waiting]}")
            break
        chunk = len(level) if backend == "slurm" else workers  # SLURM caps a running array itself; local jobs all start
        for start in range(0, len(level), chunk):
            part = level[start:start + chunk]
            with jobs.batch():
                submitted = [jobs.submit(_StageJob(stage, plan.folder(stage), store, threads)) for stage in part]
            for stage in part:
                waiting.remove(stage)
                tracker.started(stage)
            for stage, job in zip(part, submitted, strict=True):
                try:
                    tracker.finished(stage, *job.result())
                except Exception as err:  # the job itself died (node failure, out of memory, cancelled)
                    tracker.finished(stage, None, False, f"submitit job {job.job_id} failed: {err}")


class _StageJob:
    """A stage as a submitit job: requeued (and so resumed from its files) when pre-empted or timed out."""

    def __init__(self, stage: Stage, folder: Path, store: StageStore, threads: int):
        self.stage, self.folder, self.store, self.threads = stage, folder, store, threads

    def __call__(self) -> tuple[dict | None, bool, str | None]:
        torch.set_num_threads(self.threads)
        return _run_stage(self.stage, self.folder, self.store)

    def checkpoint(self, *args, **kwargs):
        import submitit  # optional: the [cluster] extra

        return submitit.helpers.DelayedSubmission(self)  # the stage's last.ckpt and caches make the rerun a resume


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in visible.split(",") if name.strip()] if visible else []
    return names or [str(index) for index in range(torch.cuda.device_count())]


def _init_worker(threads: int, devices) -> None:
    """Each worker sees one GPU, as device 0 (the Trainer's ``devices=1``), before CUDA starts in it."""
    torch.set_num_threads(threads)
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


def _run_stage(stage: Stage, folder: Path, store: StageStore) -> tuple[dict | None, bool, str | None]:
    """``(result, ran here, None)``, or ``(None, False, error)`` with the traceback written to the stage's log."""
    try:
        with stage_log(folder / "stage.log"):
            try:
                return *store.run_once(stage.kind, stage.key, stage.work, **stage.checks), None
            except Exception as err:  # the run goes on with independent stages; KeyboardInterrupt stops it
                traceback.print_exc()  # standard error is the stage's log here
                return None, False, f"{type(err).__name__}: {err}"
    except OSError as err:  # the log itself cannot be opened (a folder in its place, no space): said here instead
        return None, False, f"its log cannot be written ({type(err).__name__}: {err}); remove or free {folder / 'stage.log'}"


class _Tracker:
    """What has run, failed or been skipped; the progress lines with elapsed time and ETA."""

    def __init__(self, plan: Plan, store: StageStore, log: IO[str]):
        self.plan, self.log = plan, log
        self.results: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.skipped: set[str] = set()
        self.position = {stage.id: k for k, stage in enumerate(plan.stages, 1)}
        self.start = time.perf_counter()
        self.estimated = self.measured = 0.0  # of the stages run here, to rescale the estimates of the rest
        self.left = 0.0
        for stage in plan.stages:
            result, problem = store.state(stage.kind, stage.key, **stage.checks)
            if result is not None:
                self.results[stage.id] = result
                self._print(stage, f"cached ({plan.folder(stage)})")
            else:
                self.left += stage.estimate_s
                if problem is not None:
                    self._print(stage, f"WARNING: damaged ({problem}) in {plan.folder(stage)}: it runs again")

    def ready(self, stage: Stage) -> bool:
        return stage.id not in self.results and all(need in self.results for need in stage.needs)

    def blocked(self, stage: Stage) -> bool:
        return any(need in self.failed or need in self.skipped for need in stage.needs)

    def started(self, stage: Stage) -> None:
        scale = self.measured / self.estimated if self.estimated > 0 else 1.0
        self._print(stage, f"running ... (elapsed {format_seconds(time.perf_counter() - self.start)}, "
                           f"ETA {format_seconds(scale * self.left)})")

    def finished(self, stage: Stage, result: dict | None, ran: bool, error: str | None) -> None:
        self.left -= stage.estimate_s
        if result is None:
            self.failed[stage.id] = error or "failed"
            self._print(stage, f"FAILED: {error} (log: {self.plan.folder(stage) / 'stage.log'})")
            return
        self.results[stage.id] = result
        if not ran:
            self._print(stage, "reused: another runner on this runs_dir finished it")
            return
        self.estimated += stage.estimate_s
        self.measured += result["stage_wall_time_s"]
        self._print(stage, f"done in {format_seconds(result['stage_wall_time_s'])}")

    def skip(self, stage: Stage) -> None:
        self.skipped.add(stage.id)
        self.left -= stage.estimate_s
        self._print(stage, "skipped: a stage it needs failed")

    def raise_failures(self) -> None:
        if not self.failed:
            return
        lines = [f"  {self.plan[stage_id].kind} {self.plan[stage_id].label}: {error}\n"
                 f"    log: {self.plan.folder(self.plan[stage_id]) / 'stage.log'}" for stage_id, error in self.failed.items()]
        raise StageFailed(
            f"{len(self.failed)} stage(s) failed, {len(self.skipped)} skipped because they needed them, "
            f"{len(self.results)} done:\n" + "\n".join(lines) + "\nFix the cause and run the same command again: "
            "finished stages are reused, and the failed ones resume."
        )

    def _print(self, stage: Stage, state: str) -> None:
        print(f"[{self.position[stage.id]}/{len(self.plan.stages)}] {stage.kind} {stage.label}: {state}",
              file=self.log, flush=True)
