"""The results files of one experiment: ``results.md`` / ``.csv``, ``records.csv``, plots, and their W&B run.

Written once every stage has run, each file atomically (:mod:`.tables` holds the tables and plots;
this module decides which of them an experiment gets and the notes that explain them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from statistics import mean

from lightning.pytorch.loggers import WandbLogger

from edm_lightning.defense.detectors import DetectorConfig
from edm_lightning.experiment import tables
from edm_lightning.experiment.config import ExperimentConfig, curve_attacks, defense_label
from edm_lightning.files import digest
from edm_lightning.progress import stage_log
from edm_lightning.tracking import finish_wandb_run

__all__ = ["write_results"]


def write_results(config: ExperimentConfig, records: list[dict], victims: dict, spreads: dict, diagnostics: dict,
                  wall_time: float, compute: float, log) -> None:
    """Write the results files of ``config`` under ``<results_dir>/<name>/`` and print ``results.md``.

    Args:
        config: the experiment.
        records: one dict per attack run (see :mod:`.tables`).
        victims: ``(defense, lambda, strength, seed) -> figures`` of each victim (training and serving stages).
        spreads: ``(averaging attack, router) -> [per-seed routing spread]``.
        diagnostics: ``router -> [per-seed member shares and coherence histograms]``.
        wall_time: seconds this invocation took.
        compute: seconds every stage took when it ran (cached ones included).
        log: where the table is printed.
    """
    out = Path(config.results_dir) / config.name
    main_weight = config.edm.diversity_weight
    rows = []
    for attack in config.attacks:
        rows += tables.summarise([r for r in records if r["attack"] == attack.title], max(attack.budgets), main_weight)
    notes = [
        f"Dataset {config.dataset}; target {config.target.arch}; EDM N={config.edm.num_members}, lambda={main_weight:g}, "
        f"OOD set {config.edm.ood_dataset}, routers {', '.join(config.edm.router_labels)}; seeds {config.seeds}; "
        "mean ± std over seeds.",
        f"Each attack at its largest budget. All stages took {compute / 60:.1f} min when they ran; this invocation "
        f"took {wall_time / 60:.1f} min (cached stages cost nothing). Configuration key {digest(config)}.",
    ]
    main_edm = f"edm-{config.edm.router_labels[0]}"
    edm_stats = [v for (defense, w, _, _), v in victims.items() if defense == main_edm and w == main_weight]
    if edm_stats and "id/coherence" in edm_stats[0]:
        notes.append(f"EDM coherence on in-distribution test data {mean(s['id/coherence'] for s in edm_stats):.3f}, "
                     f"on held-out OOD data {mean(s['ood/coherence'] for s in edm_stats):.3f}.")
    notes += _defense_notes(config, rows, spreads)
    images = []
    first = config.attacks[0]
    if tables.plot_budget_curve(records, first.title, main_weight, out / "budget_curve.png"):
        images.append("budget_curve.png")
    for title in curve_attacks(config) if config.edm.tradeoff_weights or config.defenses else []:
        attack = next(a for a in config.attacks if a.title == title)
        name = "tradeoff.png" if title == first.title else f"tradeoff_{title}.png"
        if tables.plot_tradeoff(records, title, max(attack.budgets), out / name):
            images.append(name)
    if diagnostics and tables.plot_routing_shares(diagnostics, out / "routing_shares.png"):
        images.append("routing_shares.png")
    if diagnostics and tables.plot_coherence(next(iter(diagnostics.values())), out / "coherence.png"):
        images.append("coherence.png")
    notes += [f"![{name}]({name})" for name in images]
    strongest = _strongest_attacks(records, main_weight)
    if strongest:
        notes += ["", "## Each victim against its strongest attack", ""]
        for budget, judged in strongest.items():
            notes += [*tables.strongest_attacks_markdown(judged, budget), ""]
        notes.append("## Each attack at its largest budget")
        tables.write_csv([{**v, "budget": budget, "attacks": json.dumps(v["attacks"]), "untried": " ".join(v["untried"])}
                          for budget, judged in strongest.items() for v in judged], out / "strongest.csv")
    else:
        (out / "strongest.csv").unlink(missing_ok=True)  # an earlier run's table, which these results do not have
    notes += _detector_sections(config, records, victims)
    tables.write_csv(records, out / "records.csv")
    tables.write_csv(rows, out / "results.csv")
    text = tables.write_markdown(rows, out / "results.md", f"EDM evaluation: {config.name}", notes)
    print(text, file=log, flush=True)
    print(f"results: {out / 'results.md'}", file=log, flush=True)
    if config.wandb_project:
        with stage_log(Path(config.runs_dir) / config.name / "results.log"):  # W&B's banners, not on the screen
            _log_results_to_wandb(config, rows, [out / name for name in images], out)


def _detector_sections(config: ExperimentConfig, records: list[dict], victims: dict) -> list[str]:
    """Each detector's section (:func:`.tables.detector_markdown`), under one heading; none without detectors."""
    lines = []
    for setup in config.detectors:
        delta = DetectorConfig(**setup.options).delta
        for base in setup.defends:
            label = defense_label(setup, base)
            benign = [v for (defense, _, _, _), v in victims.items() if defense == label and "benign_clients" in v]
            lines += ["", *tables.detector_markdown(label, base, delta, records, benign)]
    return ["", "## Stateful detectors: benign clients flagged, and when each attack was", *lines] if lines else []


def _strongest_attacks(records: list[dict], diversity_weight: float) -> dict[int, list[dict]]:
    """The victims against their strongest attack (:func:`.tables.strongest_attacks`) at the largest budget, and at
    each smaller one at which two attacks or more ran against one victim (the attacks run with fewer queries count
    too, so the largest budget's table judges every attack even when no two ran at the same budget).

    Returns:
        ``budget -> victims`` (victims with two attacks or more), largest budget first; empty when none has two.
    """
    attacks_at: dict[tuple, set[str]] = defaultdict(set)
    for r in records:
        attacks_at[(r["budget"], r["defense"], r.get("strength"), r.get("answers"))].add(r["attack"])
    budgets = {key[0] for key, attacks in attacks_at.items() if len(attacks) > 1}
    if records:
        budgets.add(max(r["budget"] for r in records))
    strongest = {}
    for budget in sorted(budgets, reverse=True):
        victims = [v for v in tables.strongest_attacks(records, budget, diversity_weight) if len(v["attacks"]) > 1]
        if victims:
            strongest[budget] = victims
    return strongest


def _defense_notes(config: ExperimentConfig, rows: list[dict], spreads: dict) -> list[str]:
    """The two questions users ask: which defense costs at most 1 point and stops the clone most, and how
    much of EDM's protection survives query averaging (and at how many extra queries).

    Returns:
        Markdown lines, one per attack.
    """
    notes = []
    first = config.attacks[0]
    for title in curve_attacks(config) if config.defenses else []:
        best = tables.best_within(rows, title, 0.01)
        if best:
            ranking = "; ".join(f"{r['defense']}{f' ({tables.setting(r)})' if tables.setting(r) else ''} "
                                f"{r['clone_acc_mean'] * 100:.1f}%" for r in best[:6])
            notes.append(f"{title}: at most 1 point of defender accuracy lost, lowest clone accuracy first: {ranking}.")
    for attack in config.attacks:
        averaging = attack.averaging
        copies = averaging["query_copies"]
        if copies == 1 or attack.title == first.title:
            continue
        for router in config.edm.router_labels:
            plain, averaged = (next((r for r in rows if r["attack"] == t and r["defense"] == f"edm-{router}"), None)
                               for t in (first.title, attack.title))
            spread = spreads.get((attack.title, router))
            reach = (f"; the {copies} copies of an image reach {mean(s['distinct_members'] for s in spread):.2f} distinct "
                     f"members ({spread[0]['distinct_if_random']:.2f} if routed at random), "
                     f"{mean(s['share_on_plain_member'] for s in spread):.0%} of them the image's own") if spread else ""
            if not (plain and averaged):
                continue
            what = (f"{attack.title} (K={copies} copies, noise {averaging['copy_noise']:g}, shift "
                    f"{averaging['copy_shift']} px; {averaged['queries_mean']:,.0f} queries, {copies - 1} extra "
                    f"per image) against edm-{router}")
            clones = (f"clone accuracy {averaged['clone_acc_mean'] * 100:.1f}% vs {plain['clone_acc_mean'] * 100:.1f}% "
                      f"under {first.title}")
            if plain.get("clone_acc_drop_mean", 0) > 0:  # a share of EDM's protection exists only where there was some
                kept = averaged["clone_acc_drop_mean"] / plain["clone_acc_drop_mean"]
                notes.append(f"{what}: EDM keeps {kept:.0%} of its protection (clone accuracy drop against the undefended "
                             f"model under the same attack {averaged['clone_acc_drop_mean'] * 100:.1f} vs "
                             f"{plain['clone_acc_drop_mean'] * 100:.1f} points under {first.title}; {clones}){reach}.")
            else:
                notes.append(f"{what}: EDM gave no protection under {first.title} to keep ({clones}){reach}.")
    return notes


def _log_results_to_wandb(config: ExperimentConfig, rows: list[dict], images: list[Path], out: Path) -> None:
    logger = WandbLogger(project=config.wandb_project, group=config.name, job_type="experiment",
                         name=f"{config.name}-results", save_dir=str(Path(config.runs_dir) / config.name),
                         tags=[config.dataset, "experiment"])
    try:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        logger.log_table("results", columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        for image in images:
            logger.log_image(image.stem, images=[str(image)])
        logger.experiment.config.update({"experiment": json.loads(json.dumps(asdict(config), default=str))})
    finally:
        finish_wandb_run()
