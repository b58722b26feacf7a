"""Turning per-seed attack records into the tables and plots the model-stealing literature reports.

A record is one attack run: ``attack``, ``defense`` (``none``, or ``edm-<router>``), ``diversity_weight``
(EDM's lambda; ``None`` undefended), ``budget``, ``seed`` and the measured ``defender_acc``, ``clone_acc``,
``agreement``, ``queries``, ``wall_time_s``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Iterable, Sequence

from edm_lightning.experiment.stages import write_atomic

__all__ = ["METRICS", "ResultRow", "summarise", "write_csv", "write_markdown", "plot_budget_curve", "plot_tradeoff"]

METRICS = ("defender_acc", "clone_acc", "agreement", "queries", "wall_time_s")


class ResultRow(dict):
    """One (attack, defense) line: ``<metric>_mean``/``<metric>_std`` over seeds, and EDM's drop."""


def summarise(records: Sequence[dict], budget: int | None = None, diversity_weight: float | None = None) -> list[ResultRow]:
    """Rows attack x defense at one budget and one lambda, with mean and spread over seeds.

    ``clone_acc_drop`` (EDM rows only) is the undefended clone accuracy minus EDM's, paired by seed, so
    the spread is that of the difference, not of two independent means.
    """
    chosen = [r for r in records if (budget is None or r["budget"] == budget)
              and (r["defense"] == "none" or diversity_weight is None or r["diversity_weight"] == diversity_weight)]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in chosen:
        groups[(record["attack"], record["defense"])].append(record)
    rows = []
    for (attack, defense), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != "none")):
        row = ResultRow(attack=attack, defense=defense, seeds=len(group), budget=group[0]["budget"],
                        diversity_weight=group[0].get("diversity_weight"))
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        if defense != "none":
            baseline = {r["seed"]: r["clone_acc"] for r in groups.get((attack, "none"), [])}
            drops = [baseline[r["seed"]] - r["clone_acc"] for r in group if r["seed"] in baseline]
            row["clone_acc_drop_mean"], row["clone_acc_drop_std"] = _mean_std(drops)
        rows.append(row)
    return rows


def write_csv(rows: Iterable[dict], path: Path) -> None:
    rows = list(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def write_markdown(rows: Sequence[ResultRow], path: Path, title: str, notes: Sequence[str] = ()) -> str:
    """The results table as Markdown (accuracies in %, mean ± std over seeds); returns the text."""
    lines = [f"# {title}", ""]
    lines += list(notes) + ([""] if notes else [])
    lines += [
        "| attack | defense | defender acc (%) | clone acc (%) | clone acc drop (points) | agreement (%) | queries | wall time (s) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        defense = row["defense"] if row["defense"] == "none" else f"{row['defense']} (lambda={row['diversity_weight']:g})"
        drop = _pm(row, "clone_acc_drop", 100) if "clone_acc_drop_mean" in row else "-"
        lines.append(
            f"| {row['attack']} | {defense} | {_pm(row, 'defender_acc', 100)} | {_pm(row, 'clone_acc', 100)} | {drop} "
            f"| {_pm(row, 'agreement', 100)} | {row['queries_mean']:,.0f} | {row['wall_time_s_mean']:.0f} | {row['seeds']} |"
        )
    text = "\n".join(lines) + "\n"
    write_atomic(path, text)
    return text


def plot_budget_curve(records: Sequence[dict], attack: str, diversity_weight: float | None, path: Path) -> bool:
    """Clone accuracy against query budget, undefended vs each EDM defense (mean ± std over seeds); False if < 2 budgets."""
    series = {}
    for defense in dict.fromkeys(r["defense"] for r in sorted(records, key=lambda r: r["defense"] != "none")):
        points = defaultdict(list)
        for r in records:
            if r["attack"] == attack and r["defense"] == defense and (defense == "none" or r["diversity_weight"] == diversity_weight):
                points[r["budget"]].append(r["clone_acc"] * 100)
        if points:
            series[defense] = sorted(points.items())
    if not any(len(points) > 1 for points in series.values()):
        return False
    fig, ax = _figure()
    for defense, points in series.items():
        budgets = [b for b, _ in points]
        means, stds = zip(*(_mean_std(v) for _, v in points))
        label = "undefended" if defense == "none" else f"{defense} (lambda={diversity_weight:g})"
        ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("queries (budget)")
    ax.set_ylabel("clone accuracy (%)")
    ax.set_title(f"{attack}: clone accuracy against query budget")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", framealpha=0.6)
    _save(fig, path)
    return True


def plot_tradeoff(records: Sequence[dict], attack: str, budget: int, defense: str, path: Path) -> bool:
    """Defender accuracy (x) against clone accuracy (y) as lambda varies for ``defense``; the undefended model as a reference."""
    by_weight = defaultdict(list)
    for r in records:
        if r["attack"] == attack and r["budget"] == budget and r["defense"] in ("none", defense):
            by_weight[None if r["defense"] == "none" else r["diversity_weight"]].append(r)
    weights = sorted(w for w in by_weight if w is not None)
    if not weights:
        return False
    fig, ax = _figure()
    xs, ys = [], []
    for weight in weights:
        group = by_weight[weight]
        x, y = mean(r["defender_acc"] * 100 for r in group), mean(r["clone_acc"] * 100 for r in group)
        xs.append(x)
        ys.append(y)
        ax.annotate(f"lambda={weight:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot(xs, ys, marker="o", label=defense)
    if None in by_weight:
        group = by_weight[None]
        ax.plot([mean(r["defender_acc"] * 100 for r in group)], [mean(r["clone_acc"] * 100 for r in group)],
                marker="*", markersize=14, linestyle="none", label="undefended")
    ax.set_xlabel("defender accuracy (%)")
    ax.set_ylabel("clone accuracy (%)")
    ax.set_title(f"{attack} ({budget:,} queries): defender vs clone accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", framealpha=0.6)
    _save(fig, path)
    return True


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def _pm(row: dict, metric: str, scale: float) -> str:
    return f"{row[f'{metric}_mean'] * scale:.1f} ± {row[f'{metric}_std'] * scale:.1f}"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4.2), dpi=120)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
