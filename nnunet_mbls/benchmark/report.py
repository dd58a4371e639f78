"""The paper-style results table of a benchmark: aggregation over cases, paired differences, plots.

Inputs are the files of the calibration step of each cell (``calibration.json`` and
``calibration/evaluation_{before,after}.json``). Every validation case of every finished fold is
one sample; a case appears in one fold only. ``mean ± std`` is over cases (the paper's
aggregation). The paired difference of a trainer to the baseline uses the cases both have, with a
two-sided Wilcoxon signed-rank p-value.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..io import atomic_write, atomic_write_json, atomic_write_text
from ..plotting import default_style
from .grid import Cell

METRICS = ("dice", "hd95", "ece", "cece", "nll", "brier")
#: which direction is better, for "wins" counts
HIGHER_IS_BETTER = {"dice": True, "hd95": False, "ece": False, "cece": False, "nll": False, "brier": False}
STAGES = ("before", "after")


def case_values(evaluation: dict) -> dict[str, dict[str, float]]:
    """case -> metric -> value; Dice and HD95 are averaged over the foreground classes of the case."""
    out = {}
    for case, m in evaluation["per_case"].items():
        row = {k: float(m[k]) for k in ("ece", "cece", "nll", "brier")}
        for key in ("dice", "hd95"):
            values = [v for v in m[key].values() if not math.isnan(v)]
            row[key] = float(np.mean(values)) if values else math.nan
        out[case] = row
    return out


def load_cell(cell: Cell) -> dict | None:
    """The calibration outputs of one cell, or None when its calibration step has not run."""
    folder = cell.folder
    if not (folder / "calibration.json").is_file():
        return None
    calibration = json.loads((folder / "calibration.json").read_text())
    stages = {s: json.loads((folder / "calibration" / f"evaluation_{s}.json").read_text()) for s in STAGES}
    return {
        "temperature": calibration["temperature"],
        "cases": {s: case_values(stages[s]) for s in STAGES},
        "reliability": {s: stages[s]["reliability"] for s in STAGES},
    }


def mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan, len(finite)


def paired(a: dict[str, float], b: dict[str, float], higher_is_better: bool) -> dict:
    """Difference a − b over common cases: mean, std, n, wins of a, Wilcoxon p."""
    from scipy.stats import wilcoxon

    common = [c for c in a if c in b and not math.isnan(a[c]) and not math.isnan(b[c])]
    diff = np.array([a[c] - b[c] for c in common])
    if diff.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "wins": 0, "p": math.nan}
    wins = int(np.sum(diff > 0) if higher_is_better else np.sum(diff < 0))
    p = float(wilcoxon(diff).pvalue) if diff.size >= 2 and np.any(diff != 0) else math.nan
    return {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if diff.size > 1 else math.nan,
            "n": int(diff.size), "wins": wins, "p": p}


def pooled_reliability(curves: list[dict]) -> dict:
    """Sum per-bin counts over folds; confidence/accuracy become count-weighted means."""
    count = np.sum([np.asarray(c["count"], float) for c in curves], axis=0)
    out = {"bin_lower": curves[0]["bin_lower"], "bin_upper": curves[0]["bin_upper"], "count": count}
    for key in ("confidence", "accuracy"):
        weighted = np.sum([np.nan_to_num(np.asarray(c[key], float)) * np.asarray(c["count"], float) for c in curves], axis=0)
        out[key] = np.where(count > 0, weighted / np.maximum(count, 1), np.nan)
    return out


def build_results(cells: list[Cell], baseline: str | None) -> dict:
    """Aggregate one dataset's cells into rows per trainer (see the module docstring)."""
    by_trainer: dict[str, list[tuple[Cell, dict | None]]] = defaultdict(list)
    for cell in cells:
        by_trainer[cell.trainer].append((cell, load_cell(cell)))
    missing = [f"{c.label()}: {c.missing_reason()}" for entries in by_trainer.values() for c, d in entries if d is None]
    rows, per_case, reliability = {}, {}, {}
    for trainer, entries in by_trainer.items():
        done = [(c, d) for c, d in entries if d is not None]
        cases = {s: {case: v for _, d in done for case, v in d["cases"][s].items()} for s in STAGES}
        per_case[trainer] = cases
        row = {"folds_done": [c.fold for c, _ in done], "folds_missing": [c.fold for c, d in entries if d is None],
               "temperatures": [d["temperature"] for _, d in done], "num_cases": len(cases["before"])}
        for s in STAGES:
            for m in METRICS:
                mean, std, n = mean_std([v[m] for v in cases[s].values()])
                row[f"{m}_{s}"] = {"mean": mean, "std": std, "n": n}
        rows[trainer] = row
        if done:
            reliability[trainer] = pooled_reliability([d["reliability"]["before"] for _, d in done])
    if baseline in per_case:
        for trainer in rows:
            if trainer == baseline:
                continue
            for s in STAGES:
                for m in METRICS:
                    rows[trainer][f"{m}_{s}_vs_baseline"] = paired(
                        {c: v[m] for c, v in per_case[trainer][s].items()},
                        {c: v[m] for c, v in per_case[baseline][s].items()},
                        HIGHER_IS_BETTER[m],
                    )
    return {"baseline": baseline, "rows": rows, "missing_cells": missing, "per_case": per_case, "reliability": reliability}


def fmt(stat: dict, digits: int = 4) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "n/a"
    std = "" if math.isnan(stat["std"]) else f" ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{std}"


def fmt_diff(stat: dict, digits: int = 4) -> str:
    if stat["n"] == 0:
        return "n/a"
    p = "" if math.isnan(stat["p"]) else f", p={stat['p']:.2g}"
    return f"{stat['mean']:+.{digits}f} ({stat['wins']}/{stat['n']} better{p})"


def markdown(dataset: str, results: dict, description: str = "") -> str:
    rows, baseline = results["rows"], results["baseline"]
    header = "| trainer | folds | cases | Dice | HD95 (mm) | ECE | CECE | NLL | Brier |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    out = [f"# Benchmark: {dataset}", ""]
    if description:
        out += [f"Dataset: {description}", ""]
    out += ["Mean ± std over validation cases (per-case metrics, the paper's aggregation); ECE/CECE/NLL/Brier on "
            "foreground voxels (ground truth ≠ 0), 15 bins.", ""]
    for stage, title in (("before", "As trained"), ("after", "After temperature scaling (T fitted per fold on its validation cases)")):
        out += [f"## {title}", "", header, rule]
        for trainer, row in rows.items():
            folds = f"{len(row['folds_done'])}/{len(row['folds_done']) + len(row['folds_missing'])}"
            t = "" if stage == "before" or not row["temperatures"] else f" (T={', '.join(f'{x:.2f}' for x in row['temperatures'])})"
            cells = [fmt(row[f"{m}_{stage}"], 2 if m == "hd95" else 4) for m in METRICS]
            out.append(f"| {trainer}{t} | {folds} | {row['num_cases']} | " + " | ".join(cells) + " |")
        out.append("")
        if baseline in rows:
            out += [f"Paired difference to {baseline} on the same cases ({stage.replace('before', 'as trained').replace('after', 'after temperature scaling')}; "
                    "'better' counts cases where the trainer wins; Wilcoxon signed-rank p):", "",
                    "| trainer | ΔDice | ΔHD95 (mm) | ΔECE | ΔCECE | ΔNLL | ΔBrier |", "|---|---|---|---|---|---|---|"]
            for trainer, row in rows.items():
                if trainer != baseline:
                    out.append(f"| {trainer} | " + " | ".join(
                        fmt_diff(row[f"{m}_{stage}_vs_baseline"], 2 if m == "hd95" else 4) for m in METRICS) + " |")
            out.append("")
    if results["missing_cells"]:
        out += ["## Missing cells (not trained or not calibrated yet; rows above use only the finished folds)", ""]
        out += [f"- {m}" for m in results["missing_cells"]] + [""]
    return "\n".join(out)


def csv_text(results: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trainer", "stage", "metric", "mean", "std", "n", "diff_vs_baseline", "diff_std", "diff_n", "wins", "p"])
    for trainer, row in results["rows"].items():
        for s in STAGES:
            for m in METRICS:
                stat = row[f"{m}_{s}"]
                diff = row.get(f"{m}_{s}_vs_baseline", {"mean": "", "std": "", "n": "", "wins": "", "p": ""})
                writer.writerow([trainer, s, m, stat["mean"], stat["std"], stat["n"],
                                 diff["mean"], diff["std"], diff["n"], diff["wins"], diff["p"]])
    return buffer.getvalue()


def plot_scatter(results: dict, path: Path, dataset: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with default_style():
        fig = Figure(figsize=(6.5, 5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for trainer, cases in results["per_case"].items():
            values = list(cases["before"].values())
            if not values:
                continue
            dice, ece = [v["dice"] for v in values], [v["ece"] for v in values]
            points = ax.scatter(dice, ece, alpha=0.25, s=12)
            ax.scatter([np.nanmean(dice)], [np.nanmean(ece)], s=90, marker="D", edgecolor="black",
                       color=points.get_facecolor()[0][:3], label=trainer)
        ax.set(xlabel="Dice (mean over foreground classes)", ylabel="foreground ECE",
               title=f"{dataset}: per case (dots) and mean (diamonds)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_results(dataset: str, results: dict, out_folder: Path, description: str = "") -> Path:
    """results.{md,csv,json}, reliability.png (all trainers overlaid) and ece_vs_dice.png."""
    from ..calibration.reliability import plot_reliability

    out_folder.mkdir(parents=True, exist_ok=True)
    md = markdown(dataset, results, description)
    atomic_write_text(out_folder / "results.md", md)
    atomic_write_text(out_folder / "results.csv", csv_text(results))
    serialisable = dict(results, reliability={k: {kk: np.asarray(vv).tolist() for kk, vv in v.items()}
                                              for k, v in results["reliability"].items()})
    atomic_write_json(out_folder / "results.json", serialisable)
    if results["reliability"]:
        plot_reliability(results["reliability"], out_folder / "reliability.png",
                         title=f"{dataset}: foreground voxels, as trained, pooled over folds")
        plot_scatter(results, out_folder / "ece_vs_dice.png", dataset)
    return out_folder / "results.md"
