"""CONTRIBUTING.md's examples work as written: its attack registers and keeps its budget, its router routes."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from edm_lightning.attacks import ATTACKS
from edm_lightning.routing import ROUTERS, build_router
from tests.helpers.files import REPO_ROOT
from tests.helpers.victims import AnsweredThenKilled

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "CONTRIBUTING.md").read_text(), re.S)


def load_example(source: str, name: str, monkeypatch) -> types.ModuleType:
    """Run a CONTRIBUTING.md block as module ``name`` (importable, as a plug-in's module is), registries restored after."""
    for registry in (ATTACKS, ROUTERS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source, f"CONTRIBUTING.md ({name})", "exec"), module.__dict__)
    return module


def test_the_example_attack_registers_runs_and_never_passes_its_budget_over_a_kill(fake_data, monkeypatch, tmp_path: Path):
    load_example(BLOCKS[0], "contributing_noise", monkeypatch)
    entry = ATTACKS.get("noise")
    settings = dict(dataset="fashionmnist", budget=200, batch_size=32, max_epochs=1, root=str(tmp_path),
                    cache_dir=str(tmp_path / "cache"))
    killed = AnsweredThenKilled(killed_in=3)  # the victim's test-set labels are one call: killed in the 2nd purchase
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        entry.build(killed, **settings).run({"accelerator": "cpu"})
    resumed = AnsweredThenKilled()
    figures = entry.build(resumed, **settings).run({"accelerator": "cpu"})
    answered = killed.rows + resumed.rows - 2 * 300  # less the two runs' evaluation labels (300 test images each)
    assert answered <= 200 and answered <= figures["queries"] <= 200
    assert 0 <= figures["clone_acc"] <= 1


def test_the_example_router_registers_routes_in_range_and_exports(monkeypatch):
    load_example(BLOCKS[1], "contributing_brightness", monkeypatch)
    router = build_router({"class_path": "brightness", "init_args": {"gamma": 0.5}}, 4)
    x = torch.rand(256, 1, 28, 28) ** 3
    routes = router(x)
    assert routes.min() >= 0 and routes.max() < 4 and len(routes.unique()) > 1
    assert type(router).exportable and torch.equal(router.export_route(x), routes)  # what an exported graph computes
