"""Turning per-seed attack records into the tables and plots the model-stealing literature reports.

A record is one attack run: ``attack`` (its label), ``answers`` (``probabilities``, or ``top-1`` where the victim
answers its top-1 label only), ``defense`` (``none``; ``edm-<router>``; an
output-perturbation defense's name, alone or composed as ``edm-<router>+<name>``), ``diversity_weight``
(EDM's lambda; ``None`` without EDM), ``strength_name`` / ``strength`` (the defense's swept parameter;
``None`` without one), ``budget``, ``seed`` and the measured ``defender_acc``, ``clone_acc``,
``agreement``, ``queries``, ``wall_time_s``; where the experiment measures it, ``defender_acc_corrupted`` (the
defender's accuracy on mildly corrupted test images).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from edm_lightning.files import write_atomic

__all__ = ["METRICS", "ResultRow", "best_within", "plot_budget_curve", "plot_coherence", "plot_routing_shares",
           "plot_tradeoff", "setting", "strongest_attacks", "strongest_attacks_markdown", "summarise", "write_csv",
           "write_markdown"]

METRICS = ("defender_acc", "clone_acc", "agreement", "queries", "wall_time_s")
#: Figures only some experiments measure: summarised where every record of a row has them.
OPTIONAL_METRICS = ("defender_acc_corrupted",)


class ResultRow(dict):
    """One (attack, defense, strength) line: ``<metric>_mean``/``<metric>_std`` over seeds, and the
    drops against the undefended row of the same attack.
    """


def summarise(records: Sequence[dict], budget: int | None = None, diversity_weight: float | None = None) -> list[ResultRow]:
    """Rows attack x defense x strength at one budget and one lambda, with mean and spread over seeds.

    ``clone_acc_drop`` is the undefended clone accuracy minus the defended one and ``defender_acc_loss``
    the undefended model's test accuracy minus the defended one, both paired by seed, so their spread is
    that of the difference, not of two independent means.

    Returns:
        One dict per row, with ``*_mean`` and ``*_std`` columns.
    """
    chosen = [r for r in records if (budget is None or r["budget"] == budget)
              and (diversity_weight is None or r.get("diversity_weight") in (None, diversity_weight))]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in chosen:
        groups[(record["attack"], record["defense"], record.get("strength"))].append(record)
    attacks = list(dict.fromkeys(r["attack"] for r in chosen))
    rows = []
    for (attack, defense, strength), group in sorted(groups.items(), key=lambda item: _row_order(item[0], attacks)):
        row = ResultRow(attack=attack, defense=defense, seeds=len(group), budget=group[0]["budget"],
                        diversity_weight=group[0].get("diversity_weight"),
                        strength_name=group[0].get("strength_name"), strength=strength)
        for metric in METRICS + tuple(m for m in OPTIONAL_METRICS if all(m in r for r in group)):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        if defense != "none":
            undefended = {r["seed"]: r for r in groups.get((attack, "none", None), [])}
            paired = [(undefended[r["seed"]], r) for r in group if r["seed"] in undefended]
            drops = [u["clone_acc"] - r["clone_acc"] for u, r in paired]
            row["clone_acc_drop_mean"], row["clone_acc_drop_std"] = _mean_std(drops)
            row["defender_acc_loss_mean"], row["defender_acc_loss_std"] = _mean_std(
                [u["defender_acc"] - r["defender_acc"] for u, r in paired])
        rows.append(row)
    return rows


def setting(row: dict) -> str:
    """``lambda=1, tau=0.7``: what distinguishes a defended row besides its defense's name."""
    parts = []
    if row.get("diversity_weight") is not None:
        parts.append(f"lambda={row['diversity_weight']:g}")
    if row.get("strength") is not None:
        parts.append(f"{row['strength_name']}={row['strength']:g}")
    return ", ".join(parts)


def best_within(rows: Sequence[dict], attack: str, max_loss: float) -> list[dict]:
    """Defended rows of ``attack`` losing at most ``max_loss`` defender accuracy, lowest clone accuracy first."""
    eligible = [r for r in rows if r["attack"] == attack and r["defense"] != "none"
                and not math.isnan(r.get("defender_acc_loss_mean", math.nan)) and r["defender_acc_loss_mean"] <= max_loss]
    return sorted(eligible, key=lambda r: r["clone_acc_mean"])


def strongest_attacks(records: Sequence[dict], budget: int, diversity_weight: float | None) -> list[dict]:
    """Each victim against its strongest attack with at most ``budget`` queries: the evaluation standard of security
    defenses (a defense is as strong as the best attack tried against it; Carlini et al. 2019), not an average.

    A victim is a (defense, strength, answer policy) triple: a victim answering top-1 labels only (``answers``
    ``top-1`` in the records, what most production APIs return) is judged apart from the same model answering
    probabilities. Each attack counts with its best run at any budget up to ``budget`` (an attacker who can pay 50k
    can run a 5k attack). The strongest attack is the one whose clone accuracy (mean over seeds) is highest.
    ``protection_left`` is the undefended model's strongest clone accuracy (same answer policy, over the same attacks)
    minus this victim's: a defense that stops one attack but not another is credited only with what holds against
    both, and never for an attack that was not tried against it (``untried`` names those).

    Args:
        records: per-seed attack records (see the module docstring; ``answers`` defaults to ``probabilities``).
        budget: the most queries an attack may spend.
        diversity_weight: EDM's lambda whose victims are judged (other lambdas' records are left out).

    Returns:
        One dict per victim, undefended first, then least protection left first: ``defense``, ``answers``,
        ``strength_name``, ``strength``, ``diversity_weight``, ``defender_acc_mean``/``_std``, ``strongest`` (the
        attack's label), ``strongest_budget``, ``clone_acc_mean``/``_std`` under it, ``protection_left`` (a fraction;
        NaN without an undefended row), ``attacks`` (``{label: clone_acc_mean}`` of every attack tried, strongest
        first), ``untried`` (attacks run against the undefended model but not this victim), ``seeds``; and
        ``defender_acc_corrupted_mean``/``_std`` where the records carry that figure.
    """
    chosen = [r for r in records if r["budget"] <= budget]
    answers = {r["attack"]: r.get("answers", "probabilities") for r in chosen}
    best: dict[tuple, dict[str, ResultRow]] = defaultdict(dict)
    for each_budget in sorted({r["budget"] for r in chosen}):
        for row in summarise(chosen, each_budget, diversity_weight):
            victim, attack = (row["defense"], row["strength"], answers[row["attack"]]), row["attack"]
            if attack not in best[victim] or row["clone_acc_mean"] > best[victim][attack]["clone_acc_mean"]:
                best[victim][attack] = row
    result = []
    for (defense, strength, policy), by_attack in best.items():
        ranked = sorted(by_attack.values(), key=lambda r: -r["clone_acc_mean"])
        top = ranked[0]
        undefended = best.get(("none", None, policy), {})
        shared = [undefended[a]["clone_acc_mean"] for a in by_attack if a in undefended]
        result.append({"defense": defense, "answers": policy, "strength_name": top["strength_name"], "strength": strength,
                       "diversity_weight": top["diversity_weight"], "defender_acc_mean": top["defender_acc_mean"],
                       "defender_acc_std": top["defender_acc_std"], "strongest": top["attack"],
                       **{k: top[k] for k in ("defender_acc_corrupted_mean", "defender_acc_corrupted_std") if k in top},
                       "strongest_budget": top["budget"], "clone_acc_mean": top["clone_acc_mean"],
                       "clone_acc_std": top["clone_acc_std"],
                       "protection_left": max(shared) - top["clone_acc_mean"] if shared else math.nan,
                       "attacks": {r["attack"]: r["clone_acc_mean"] for r in ranked},
                       "untried": sorted(set(undefended) - set(by_attack)), "seeds": top["seeds"]})

    def order(victim: dict) -> tuple:
        left = victim["protection_left"]
        return victim["answers"] != "probabilities", victim["defense"] != "none", math.isnan(left), left

    return sorted(result, key=order)


def strongest_attacks_markdown(victims: Sequence[dict], budget: int) -> list[str]:
    """The table of :func:`strongest_attacks` as Markdown lines (accuracies in %).

    Returns:
        The lines: a sentence saying what the table is, a blank line, the table.
    """
    lines = [f"Each victim against its strongest attack with at most {budget:,} queries (the highest clone accuracy of "
             "the attacks run against it, each at its best budget up to that; protection left = the undefended model's "
             "strongest clone over the same attacks minus this one, in points):",
             "",
             "| victim | answers | setting | defender acc (%) | strongest attack | clone acc (%) | protection left (points) "
             "| every attack tried (clone acc %) | not tried | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    corrupted = any("defender_acc_corrupted_mean" in v for v in victims)
    if corrupted:  # the benign cost on mildly corrupted test images, beside the clean one
        lines[2:4] = [lines[2].replace("| defender acc (%) |", "| defender acc (%) | defender acc, corrupted (%) |"),
                      lines[3] + " --- |"]
    for v in victims:
        left = "-" if v["defense"] == "none" or math.isnan(v["protection_left"]) else f"{v['protection_left'] * 100:.1f}"
        strongest = v["strongest"] + (f" ({v['strongest_budget']:,})" if v["strongest_budget"] != budget else "")
        tried = ", ".join(f"{label} {acc * 100:.1f}" for label, acc in v["attacks"].items())
        accuracy = _pm(v, "defender_acc", 100) + (
            f" | {_pm(v, 'defender_acc_corrupted', 100) if 'defender_acc_corrupted_mean' in v else '-'}" if corrupted else "")
        lines.append(f"| {v['defense']} | {v['answers']} | {setting(v) or '-'} | {accuracy} "
                     f"| {strongest} | {_pm(v, 'clone_acc', 100)} | {left} | {tried} | {', '.join(v['untried']) or '-'} "
                     f"| {v['seeds']} |")
    return lines


def detector_markdown(label: str, base: str, delta: float, records: Sequence[dict], benign: Sequence[dict]) -> list[str]:
    """A detector's section of ``results.md``: its honest clients flagged, then when it flagged each attack and the
    clone accuracy behind it next to the same attack on the victim it watches (``base``).

    Args:
        label: the detector's victim (``prada``, ``edm-neural+prada``).
        base: the victim it watches (``none``, ``edm-neural``).
        delta: its threshold on the Shapiro-Wilk W.
        records: every attack record (those of ``label`` and ``base`` are used).
        benign: the benign-client figures per seed.

    Returns:
        Markdown lines.
    """
    clients = sum(b["benign_clients"] for b in benign)
    flagged = sum(b["benign_flagged"] for b in benign)
    w_min = min((b["benign_w_min"] for b in benign if b.get("benign_w_min") is not None), default=math.nan)
    lines = [f"### {label}", "",
             f"Benign clients flagged: {flagged} of {clients} ({100 * flagged / max(clients, 1):.1f}%); the lowest W any "
             f"benign client reached: {w_min:.3f} (delta {delta:g}).", "",
             f"| attack | budget | flagged after (queries, per seed) | clone acc. behind {label} | on {base} | drop |",
             "|---|---|---|---|---|---|"]
    watched = [r for r in records if r["defense"] == label]
    for attack, budget in sorted({(r["attack"], r["budget"]) for r in watched}, key=lambda k: (k[0], k[1])):
        runs = [r for r in watched if (r["attack"], r["budget"]) == (attack, budget)]
        plain = [r["clone_acc"] for r in records if r["defense"] == base and (r["attack"], r["budget"]) == (attack, budget)
                 and r.get("answers") == runs[0].get("answers") and r["diversity_weight"] == runs[0]["diversity_weight"]]
        flags = ", ".join("never" if r.get("flagged_at") in (None, "") else f"{int(r['flagged_at']):,}" for r in runs)
        behind = mean(r["clone_acc"] for r in runs)
        before = mean(plain) if plain else math.nan
        lines.append(f"| {attack} | {budget:,} | {flags} | {100 * behind:.1f}% | {100 * before:.1f}% | "
                     f"{100 * (before - behind):.1f} |")
    return lines


def _row_order(key: tuple, attacks: list[str]) -> tuple:
    attack, defense, strength = key
    kind = 0 if defense == "none" else 1 if "+" not in defense and defense.startswith("edm-") else 2
    return attacks.index(attack), kind, defense, -math.inf if strength is None else strength


def write_csv(rows: Iterable[dict], path: Path) -> None:
    """Write ``rows`` as CSV (columns in first-seen order), atomically."""
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
        "| attack | defense | setting | defender acc (%) | defender acc loss (points) | clone acc (%) "
        "| clone acc drop (points) | agreement (%) | queries | wall time (s) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        loss = _pm(row, "defender_acc_loss", 100) if "defender_acc_loss_mean" in row else "-"
        drop = _pm(row, "clone_acc_drop", 100) if "clone_acc_drop_mean" in row else "-"
        lines.append(
            f"| {row['attack']} | {row['defense']} | {setting(row) or '-'} | {_pm(row, 'defender_acc', 100)} | {loss} "
            f"| {_pm(row, 'clone_acc', 100)} | {drop} | {_pm(row, 'agreement', 100)} | {row['queries_mean']:,.0f} "
            f"| {row['wall_time_s_mean']:.0f} | {row['seeds']} |"
        )
    text = "\n".join(lines) + "\n"
    write_atomic(path, text)
    return text


def plot_budget_curve(records: Sequence[dict], attack: str, diversity_weight: float | None, path: Path) -> bool:
    """Clone accuracy against query budget, undefended vs each EDM defense (mean ± std over seeds); False if < 2 budgets."""
    series = {}
    plain = [r for r in records if r.get("strength") is None and "+" not in r["defense"]]  # undefended and EDM alone
    for defense in dict.fromkeys(r["defense"] for r in sorted(plain, key=lambda r: r["defense"] != "none")):
        points = defaultdict(list)
        for r in plain:
            if r["attack"] == attack and r["defense"] == defense and (
                defense == "none" or r["diversity_weight"] == diversity_weight
            ):
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
    budgets = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(budgets, [f"{b / 1000:g}k" if b >= 1000 else str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("queries (budget)")
    ax.set_ylabel("clone accuracy (%)")
    ax.set_title(f"{attack}: clone accuracy against query budget")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", framealpha=0.6)
    _save(fig, path)
    return True


def plot_tradeoff(records: Sequence[dict], attack: str, budget: int, path: Path) -> bool:
    """Defender accuracy (x) against clone accuracy (y) under ``attack``: one curve per defense as its
    strength varies (EDM alone: as lambda varies), the undefended model as a star, error bars the spread
    over seeds. The right panel zooms on the defenses that cost at most 1 point of defender accuracy, where
    they crowd, and names each point's strength. False if nothing to draw.

    Returns:
        Whether a plot was written to ``path``.
    """
    curves: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["attack"] == attack and r["budget"] == budget:
            position = r.get("strength") if r.get("strength") is not None else r.get("diversity_weight")
            curves[r["defense"]][position].append(r)
    undefended = curves.pop("none", {}).get(None, [])
    if not curves:
        return False
    reference = mean(r["defender_acc"] * 100 for r in undefended) if undefended else None
    fig, axes = _figure(ncols=2 if reference is not None else 1)
    panels = list(axes) if reference is not None else [axes]
    for panel, ax in enumerate(panels):
        zoomed = panel == 1
        for color, (defense, points) in enumerate(curves.items()):
            xs, ys, xerr, yerr, names = [], [], [], [], []
            for position in sorted(points, key=lambda v: -math.inf if v is None else v):
                group = points[position]
                (x, dx), (y, dy) = (_mean_std([r[key] * 100 for r in group]) for key in ("defender_acc", "clone_acc"))
                if zoomed and x < reference - 1.0:
                    continue
                xs.append(x), ys.append(y), xerr.append(dx), yerr.append(dy)
                name = "lambda" if group[0].get("strength") is None else group[0].get("strength_name")
                names.append(f"{name}={position:g}" if position is not None and len(points) > 1 else "")
            if not xs:
                continue
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", markersize=4, capsize=2, color=f"C{color % 10}",
                        label=defense)
            for x, y, name in zip(xs, ys, names) if zoomed or len(panels) == 1 else ():
                if name:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        if reference is not None:
            ax.plot([reference], [mean(r["clone_acc"] * 100 for r in undefended)], marker="*", markersize=14,
                    linestyle="none", color="black", label="undefended")
        if zoomed:
            ax.axvspan(reference - 1.0, reference + 0.5, color="green", alpha=0.06)
            ax.set_xlim(reference - 1.2, reference + 0.5)
            ax.set_title("at most 1 point of defender accuracy lost", fontsize=9)
        else:
            ax.set_title(f"{attack} ({budget:,} queries): defender vs clone accuracy", fontsize=9)
            ax.legend(loc="best", framealpha=0.6, fontsize=6)
        ax.set_xlabel("defender accuracy (%)")
        ax.set_ylabel("clone accuracy (%)")
        ax.grid(True, alpha=0.3)
    _save(fig, path)
    return True


def plot_routing_shares(diagnostics: dict[str, Sequence[dict]], path: Path) -> bool:
    """Each member's share of the defender's test images and of the attacker's surrogate images, one panel per
    router (mean over seeds; the dashed line is the fair share 1/N). False if there is nothing to draw.

    Returns:
        Whether a plot was written to ``path``.
    """
    routers = [router for router, seeds in diagnostics.items() if seeds]
    if not routers:
        return False
    fig, axes = _figure(ncols=len(routers), sharey=True)
    for ax, router in zip(np.atleast_1d(axes), routers, strict=True):
        seeds = diagnostics[router]
        members = len(seeds[0]["share_test"])
        positions = np.arange(members)
        kinds = [("share_test", "defender's test images")] + (
            [("share_surrogate", "attacker's surrogate images")] if "share_surrogate" in seeds[0] else [])
        width = 0.8 / len(kinds)
        for k, (key, label) in enumerate(kinds):
            shares = np.mean([seed[key] for seed in seeds], axis=0) * 100
            ax.bar(positions + (k - (len(kinds) - 1) / 2) * width, shares, width, label=label)
        ax.axhline(100 / members, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(positions, [str(m) for m in positions])
        ax.set_xlabel("member")
        ax.set_title(f"{router} router")
        ax.grid(True, axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("share of queries (%)")
    np.atleast_1d(axes)[0].legend(loc="best", fontsize=7, framealpha=0.6)
    _save(fig, path)
    return True


def plot_coherence(seeds: Sequence[dict], path: Path) -> bool:
    """Histograms of the ensemble's coherence on in-distribution test images and on held-out OOD images
    (summed over seeds): EDM wants the first near 1 (members agree) and the second near 0. False if empty.

    Returns:
        Whether a plot was written to ``path``.
    """
    if not seeds or "coherence_edges" not in seeds[0]:
        return False
    edges = np.asarray(seeds[0]["coherence_edges"])
    fig, ax = _figure()
    for key, label in (("coherence_id", "in-distribution (test)"), ("coherence_ood", "out-of-distribution (held out)")):
        counts = np.sum([seed[key] for seed in seeds], axis=0)
        ax.stairs(counts / counts.sum() * 100, edges, fill=True, alpha=0.5, label=label)
    ax.set_xlabel("coherence of the ensemble on an input")
    ax.set_ylabel("share of inputs (%)")
    ax.set_title("EDM: members agree in distribution, disagree out of it")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", fontsize=7, framealpha=0.6)
    _save(fig, path)
    return True


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def _pm(row: dict, metric: str, scale: float) -> str:
    mean_text = f"{row[f'{metric}_mean'] * scale:.1f}"
    return f"{'0.0' if mean_text == '-0.0' else mean_text} ± {row[f'{metric}_std'] * scale:.1f}"  # float noise below 0


def _figure(ncols: int = 1, **kwargs) -> tuple[Figure, Any]:
    # matplotlib's object API, not pyplot: no global figure state, no GUI backend, safe in worker processes.
    fig = Figure(figsize=(6 * ncols if ncols > 1 else 6, 4.2), dpi=120)
    return fig, fig.subplots(1, ncols, **kwargs)


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
