"""Progress a person can follow: a bar in a terminal, plain periodic lines in a log file.

Long loops report through :class:`Progress` (a tqdm bar when standard error is a terminal, otherwise a
line every 30 seconds and one when the work is done); training outside a terminal
reports one line per epoch (:class:`EpochLines`). :func:`stage_log` sends what libraries print for every
job (Lightning's device lines and tips, W&B's run banners, deprecation warnings) to a stage's log file
instead of the screen; progress meant for a person still reaches the screen through :func:`console`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import lightning as L
from tqdm import tqdm
from typing_extensions import override

__all__ = ["EpochLines", "Progress", "console", "format_seconds", "interactive", "stage_log"]

_console: IO[str] | None = None  # the screen's stream while a stage's own output goes to its log


def console() -> IO[str]:
    """Where progress meant for a person goes: standard error, also while :func:`stage_log` captures it."""
    return _console or sys.stderr


def interactive() -> bool:
    """Whether the console is a terminal (progress bars) rather than a file or a pipe (plain lines)."""
    return _is_terminal(console())


class Progress:
    """Counts work done of ``total`` and shows rate and ETA.

    Args:
        total: units of work in all (queries, images).
        description: what is counted (``buying transfer set``).
        unit: name of one unit (``query``).
        initial: units already done before this run (a resume).
        stream: where to write (default: standard error).
        every_s: longest gap between plain lines.
    """

    def __init__(self, total: int, description: str, unit: str = "it", initial: int = 0, stream: IO[str] | None = None,
                 every_s: float = 30.0):
        self.total, self.description, self.unit = int(total), description, unit
        self.done = self._initial = int(initial)
        self.stream = stream or console()
        self.every_s = every_s
        self._start = self._last_time = time.perf_counter()
        self._shown = self.done  # units done at the last line written
        self._bar = None
        if _is_terminal(self.stream):
            self._bar = tqdm(total=self.total, initial=self.done, desc=description, unit=unit, unit_scale=True,
                             file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, count: int) -> None:
        """Record ``count`` more units done."""
        self.done += int(count)
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.perf_counter()
        if now - self._last_time >= self.every_s:
            self._last_time = now
            self._line(now)

    def close(self) -> None:
        """Close the bar, or write the final line (if any work was done)."""
        if self._bar is not None:
            self._bar.close()
        elif self.done != self._shown:
            self._line(time.perf_counter())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self, now: float) -> None:
        self._shown = self.done
        elapsed = now - self._start
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        state = f"ETA {format_seconds(eta)}" if self.done < self.total else f"done in {format_seconds(elapsed)}"
        print(f"    {self.description}: {self.done:,}/{self.total:,} {self.unit} ({rate:,.0f}/s, {state})",
              file=self.stream, flush=True)


class EpochLines(L.Callback):
    """One line per training epoch (for logs, where a progress bar would be a stream of carriage returns)."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream
        self._start = 0.0

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/") and k.endswith(("acc", "loss", "coherence")) and "member_" not in k}
        figures = "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
        print(f"    epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {figures}  "
              f"({time.perf_counter() - self._start:.0f} s)", file=self.stream or console(), flush=True)


@contextlib.contextmanager
def stage_log(path: str | Path) -> Iterator[None]:
    """While the block runs, standard error, Lightning's log records and Python warnings go to ``path`` (appended).

    A stage's log then holds "GPU available", logger tips, W&B's banners and library deprecation warnings,
    each once per stage at most; :func:`console` still reaches the screen (Lightning's own training bar
    writes to standard output, which stays on the screen).
    """
    global _console
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _console
    with open(path, "a") as stream:
        _console = console()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
        saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
        for logger in loggers:  # Lightning gives each its own screen handler; the file takes its place
            logger.handlers, logger.propagate = [handler], False
        with warnings.catch_warnings(), contextlib.redirect_stderr(stream):
            warnings.simplefilter("default")

            def to_file(message, category, filename, lineno, file=None, line=None):
                stream.write(warnings.formatwarning(message, category, filename, lineno, line))
                stream.flush()

            warnings.showwarning = to_file
            try:
                yield
            finally:
                for logger, handlers, propagate in saved:
                    logger.handlers, logger.propagate = handlers, propagate
                _console = previous


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``; unknown -> ``?``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
