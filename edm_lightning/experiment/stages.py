"""Stages of an experiment, each keyed by its configuration: finished ones are reused, never redone.

A stage's folder is ``<runs>/<kind>-<hash of its config>``; its ``result.json`` is written last and
atomically, so a folder without one is a stage that was interrupted (it is run again, and the attack
code inside resumes from its own query cache instead of spending queries twice).

A finished stage is finished only while what it produced is whole: its ``result.json`` is read back like input
from outside (a JSON object holding the figures the runner reads, as finite numbers), and the files it lists as
its outputs must be the ones it wrote (their SHA-256 is recorded in ``result.json``). A damaged stage is run
again: its ``result.json`` and outputs are removed first, what it bought (query caches) is kept.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from edm_lightning.files import cached_file_digest, digest, to_plain, write_atomic

__all__ = ["StageStore"]

#: The key of ``result.json`` that records the SHA-256 of each of the stage's outputs, by file name.
OUTPUT_DIGESTS = "outputs"


class StageStore:
    """Runs stages once: ``run(kind, config, fn)`` returns the cached result or ``fn(folder)``'s.

    Every method takes the stage's ``outputs`` (files of its folder that outlive it, e.g. ``best.ckpt``) and
    ``figures`` (what the runner reads back from its result); a finished stage whose result lacks one, or whose
    output is missing or changed, is damaged: not cached, and run again by :meth:`run_once`.

    Args:
        root: folder holding one sub-folder per stage.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, kind: str, config: Any) -> Path:
        """``<root>/<kind>-<digest of config>``."""
        return self.root / f"{kind}-{digest(config)}"

    def state(self, kind: str, config: Any, outputs: Sequence[str] = (), figures: Sequence[str] = ()
              ) -> tuple[dict | None, str | None]:
        """Whether the stage finished, and whether what it produced is whole.

        Returns:
            ``(result, None)`` for a finished, whole stage; ``(None, None)`` for one that never finished (no
            ``result.json``); ``(None, what is wrong)`` for a damaged one.
        """
        folder = self.folder(kind, config)
        path = folder / "result.json"
        if not path.exists():
            return None, None
        try:
            result = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:  # truncated, binary, a folder, unreadable
            return None, f"result.json is not readable JSON ({type(err).__name__})"
        problem = _result_problem(result, figures) or self._outputs_problem(folder, result, outputs)
        return (None, problem) if problem else (result, None)

    def cached(self, kind: str, config: Any, outputs: Sequence[str] = (), figures: Sequence[str] = ()) -> dict | None:
        """The stage's result if it finished in an earlier run and what it produced is whole, else ``None``."""
        return self.state(kind, config, outputs, figures)[0]

    def run(self, kind: str, config: Any, fn: Callable[[Path], dict], outputs: Sequence[str] = (),
            figures: Sequence[str] = ()) -> dict:
        """The cached result, or ``fn(folder)``'s with its ``stage_wall_time_s``, written last and atomically."""
        return self.run_once(kind, config, fn, outputs, figures)[0]

    def run_once(self, kind: str, config: Any, fn: Callable[[Path], dict], outputs: Sequence[str] = (),
                 figures: Sequence[str] = ()) -> tuple[dict, bool]:
        """:meth:`run`, and whether ``fn`` ran here (``False``: the result was there, or another runner made it).

        The stage's folder is locked while it runs: a second runner on the same folder waits, then reuses
        the result instead of running (and paying for) the stage again. A damaged stage (see :meth:`state`) loses
        its ``result.json`` and ``outputs`` first, with a line on standard error (the stage's log) saying why.

        Returns:
            ``(result, ran_here)``.

        Raises:
            RuntimeError: ``fn`` returned without writing one of ``outputs``, or without one of ``figures``.
        """
        result = self.cached(kind, config, outputs, figures)
        if result is not None:
            return result, False
        folder = self.folder(kind, config)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / ".lock"):
            result, problem = self.state(kind, config, outputs, figures)  # another runner may have finished it meanwhile
            if result is not None:
                return result, False
            if problem is not None:
                print(f"stage {folder.name} is damaged ({problem}): running it again", file=sys.stderr, flush=True)
                for name in ("result.json", *outputs):
                    _remove(folder / name)
            (folder / "config.json").write_text(json.dumps(to_plain(config), indent=2, sort_keys=True))
            start = time.perf_counter()
            result = fn(folder)
            missing = [name for name in outputs if not (folder / name).is_file()]
            result = {**result, "stage_wall_time_s": round(time.perf_counter() - start, 1)}
            problem = f"it wrote no {', '.join(missing)}" if missing else _result_problem(result, figures)
            if problem is not None:  # what would be refused when read back is never written
                raise RuntimeError(f"the stage in {folder} finished, but its result is not whole ({problem}); nothing "
                                   "was recorded")
            if outputs:
                result[OUTPUT_DIGESTS] = {name: cached_file_digest(folder / name) for name in outputs}
            write_atomic(folder / "result.json", json.dumps(result, indent=2, sort_keys=True))
            return result, True

    def _outputs_problem(self, folder: Path, result: dict, outputs: Sequence[str]) -> str | None:
        """What is wrong with the stage's outputs (missing, or not the files it wrote), or ``None``."""
        recorded = result.get(OUTPUT_DIGESTS, {})
        if not isinstance(recorded, dict):
            return f"result.json's {OUTPUT_DIGESTS!r} is not a mapping of file digests"
        for name in outputs:
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if name not in recorded:  # a stage finished before digests were recorded: its output need only be there
                if path.stat().st_size == 0:
                    return f"{name} is empty"
            elif cached_file_digest(path) != recorded[name]:
                return f"{name} is not the file the stage wrote (its SHA-256 differs)"
        return None


def _result_problem(result: Any, figures: Sequence[str]) -> str | None:
    """What is wrong with a stage's result (not a mapping; a figure missing, or not a finite number or a list of them).

    Returns:
        One line, or ``None`` when nothing is wrong.
    """
    if not isinstance(result, dict):
        return f"result.json holds a {type(result).__name__}, not the stage's figures"
    for name in ("stage_wall_time_s", *figures):
        if name not in result:
            return f"result.json lacks {name!r}"
        value = result[name]
        values = value if isinstance(value, list) and value else [value]
        if not all(_finite(v) for v in values):
            return f"result.json's {name!r} is {str(value)[:40]}, not a finite number or a list of them"
    return None


def _remove(path: Path) -> None:
    """Remove a damaged ``result.json`` or output, whatever it became (a folder too)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
