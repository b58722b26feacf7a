"""Stages of an experiment, each keyed by its configuration: finished ones are reused, never redone.

A stage's folder is ``<runs>/<kind>-<hash of its config>``; its ``result.json`` is written last and
atomically, so a folder without one is a stage that was interrupted (it is run again, and the attack
code inside resumes from its own query cache instead of spending queries twice).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from edm_lightning.files import digest, to_plain, write_atomic

__all__ = ["StageStore"]


class StageStore:
    """Runs stages once: ``run(kind, config, fn)`` returns the cached result or ``fn(folder)``'s.

    Args:
        root: folder holding one sub-folder per stage.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, kind: str, config: Any) -> Path:
        """``<root>/<kind>-<digest of config>``."""
        return self.root / f"{kind}-{digest(config)}"

    def cached(self, kind: str, config: Any) -> dict | None:
        """The stage's result if it finished in an earlier run, else ``None``."""
        path = self.folder(kind, config) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, kind: str, config: Any, fn: Callable[[Path], dict]) -> dict:
        """The cached result, or ``fn(folder)``'s with its ``stage_wall_time_s``, written last and atomically."""
        return self.run_once(kind, config, fn)[0]

    def run_once(self, kind: str, config: Any, fn: Callable[[Path], dict]) -> tuple[dict, bool]:
        """:meth:`run`, and whether ``fn`` ran here (``False``: the result was there, or another runner made it).

        The stage's folder is locked while it runs: a second runner on the same folder waits, then reuses
        the result instead of running (and paying for) the stage again.

        Returns:
            ``(result, ran_here)``.
        """
        result = self.cached(kind, config)
        if result is not None:
            return result, False
        folder = self.folder(kind, config)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / ".lock"):
            result = self.cached(kind, config)  # another runner may have finished it while we waited
            if result is not None:
                return result, False
            (folder / "config.json").write_text(json.dumps(to_plain(config), indent=2, sort_keys=True))
            start = time.perf_counter()
            result = fn(folder)
            result = {**result, "stage_wall_time_s": round(time.perf_counter() - start, 1)}
            write_atomic(folder / "result.json", json.dumps(result, indent=2, sort_keys=True))
            return result, True
