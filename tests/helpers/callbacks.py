"""Callbacks that tests add from the command line (``--trainer.callbacks+=tests.helpers.callbacks.X``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class DumpMetrics(L.Callback):
    """Writes the synced metrics and the starting step of each stage to ``<dir>/metrics-rank<R>.json``."""

    def __init__(self, dir: str):
        self.dir = Path(dir)
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.record["start_step"] = trainer.global_step
        self.record["start_epoch"] = trainer.current_epoch

    def on_validation_end(self, trainer, pl_module):
        self._dump(trainer)

    def on_fit_end(self, trainer, pl_module):
        self.record["end_step"] = trainer.global_step
        self._dump(trainer)

    def _dump(self, trainer):
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.record["world_size"] = trainer.world_size
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"metrics-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class RecordRouting(L.Callback):
    """Writes the member each input of a fixed, seeded batch is routed to, per rank, after fit."""

    def __init__(self, dir: str, size: int = 64):
        self.dir = Path(dir)
        self.size = size

    def on_fit_end(self, trainer, pl_module):
        shape = tuple(pl_module.hparams.input_shape)
        x = torch.rand((self.size, *shape), generator=torch.Generator().manual_seed(0)).to(pl_module.device)
        self.dir.mkdir(parents=True, exist_ok=True)
        routes = pl_module.route(x).tolist()
        (self.dir / f"routing-rank{trainer.global_rank}.json").write_text(json.dumps(routes))


class DumpQueries(L.Callback):
    """Writes, per rank, whether this process opened the attack's oracle and how many queries it counts."""

    def __init__(self, dir: str):
        self.dir = Path(dir)

    def on_fit_end(self, trainer, pl_module):
        datamodule = trainer.datamodule
        record = {"opened_oracle": datamodule._oracle is not None, "queries_spent": datamodule.queries_spent,
                  "train_items": len(datamodule.train_set), "per_node": datamodule.prepare_data_per_node}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"queries-rank{trainer.global_rank}.json").write_text(json.dumps(record))
