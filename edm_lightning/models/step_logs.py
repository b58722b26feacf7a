"""Per-step training figures logged only on the steps the loggers write.

Lightning writes step metrics every ``log_every_n_steps`` steps, but each ``self.log`` call costs its
bookkeeping on every step (about 0.6 ms on a 2-core CPU, a fifth of a LeNet-5 step). Logging on the
written steps only keeps every figure a logger receives and the bar's periodic refresh.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

__all__ = ["log_training_step"]


def log_training_step(module: L.LightningModule, values: dict[str, Tensor], prog_bar: bool = True) -> None:
    """``module.log_dict(values)`` on the steps Lightning's loggers write (every step outside a Trainer's fit)."""
    connector = getattr(module._trainer, "_logger_connector", None)
    if connector is None or connector.should_update_logs:
        module.log_dict(values, prog_bar=prog_bar)
