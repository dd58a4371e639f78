"""The paper-style results table of a benchmark: aggregation over cases, paired differences, failure
detection, plots.

Inputs are the files of the calibration step of each cell (``calibration.json`` and
``calibration/evaluation_{before,after}.json``) and, where the validation probabilities are kept, the
per-case rows of :mod:`nnunet_mbls.benchmark.cases`. Every validation case of every finished fold is
one sample; a case appears in one fold only. ``mean ± std`` is over cases (the paper's aggregation).
The paired difference of a trainer to the baseline uses the cases both have, with a two-sided Wilcoxon
signed-rank p-value.

Stages (rows of the table): ``before`` (as trained), ``after`` (each fold's own temperature),
``shared`` (one temperature for all finished folds of the trainer, fitted on their pooled out-of-fold
validation cases: what ``nnunet-mbls calibrate -f 0 1 2 3 4`` folds into the ensemble) and, with
``--vector-scaling``, ``vector`` (one per-class scale and bias, fitted the same way on the folds' logits).

Failure detection (``failure_detection`` in results.json): per trainer and uncertainty score, how well the
score ranks the cases by risk = 1 − Dice (mean foreground Dice of the case): AURC and E-AURC (cases sorted
by ascending score; AURC = mean over k = 1..n of the mean risk of the k most confident cases; tied scores
get the expected value over their orderings), and AUROC for detecting cases with Dice < τ (τ = the 10th
percentile of the baseline trainer's Dice on the same cases), each with a 95% percentile bootstrap interval
over cases (1000 resamples, seed 0). See :mod:`nnunet_mbls.benchmark.failure`.
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

METRICS = ("dice", "hd95", "ece", "ece_adaptive", "mce", "ece_boundary", "cece", "nll", "brier")
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "ece": "ECE", "ece_adaptive": "ECE (adaptive)", "mce": "MCE",
                 "ece_boundary": "ECE (boundary)", "cece": "CECE", "nll": "NLL", "brier": "Brier"}
#: which direction is better, for "wins" counts
HIGHER_IS_BETTER = {m: m == "dice" for m in METRICS}
STAGES = ("before", "after", "shared", "vector")
STAGE_TITLES = {
    "before": "As trained",
    "after": "After temperature scaling (T fitted per fold on its validation cases)",
    "shared": "After one temperature shared by the folds (fitted on their pooled out-of-fold cases: the calibrated ensemble)",
    "vector": "After vector scaling shared by the folds (per-class scale and bias on the logits, pooled out-of-fold fit)",
}


def case_values(evaluation: dict) -> dict[str, dict[str, float]]:
    """case -> metric -> value; Dice and HD95 are averaged over the foreground classes of the case."""
    out = {}
    for case, m in evaluation["per_case"].items():
        row = {k: float(m.get(k, math.nan)) for k in ("ece", "ece_adaptive", "mce", "cece", "nll", "brier")}
        for key in ("dice", "hd95"):
            values = [v for v in m[key].values() if not math.isnan(v)]
            row[key] = float(np.mean(values)) if values else math.nan
        out[case] = row
    return out


def load_cell(cell: Cell) -> dict | None:
    """The calibration outputs of one cell, or None when its calibration step has not run."""
    from .cases import cell_case_rows

    folder = cell.folder
    if not (folder / "calibration.json").is_file():
        return None
    calibration = json.loads((folder / "calibration.json").read_text())
    stages = {s: json.loads((folder / "calibration" / f"evaluation_{s}.json").read_text()) for s in ("before", "after")}
    cases = {s: case_values(stages[s]) for s in stages}
    rows = cell_case_rows(cell)
    for row in rows:
        for stage in ("before", "after"):
            cases[stage][row["case"]]["ece_boundary"] = row[f"ece_boundary_{stage}"]
    return {
        "temperature": calibration["temperature"],
        "cases": cases,
        "case_rows": rows,
        "reliability": {s: stages[s]["reliability"] for s in stages},
    }


def shared_stages(done: list[tuple[Cell, dict]], vector: bool, device: str) -> dict[str, dict]:
    """Stage -> {"cases": case -> metrics, ...} for one temperature (and optionally one vector scaling) shared
    by a trainer's finished folds, fitted on their pooled out-of-fold cases; {} with fewer than 2 folds or
    without their validation probabilities. Nothing is written into the folds (the benchmark only measures)."""
    from ..calibrate import DEFAULT_FIT_REGION, DEFAULT_MAX_VOXELS, fit_temperature_on, gt_folder_for, plans_of

    folders = [c.folder for c, _ in done]
    if len(folders) < 2 or any(not d["case_rows"] for _, d in done):
        return {}
    trainer_folder = folders[0].parent
    dataset_json = json.loads((trainer_folder / "dataset.json").read_text())
    fit = fit_temperature_on(gt_folder_for(folders[0]), [f / "validation" for f in folders], dataset_json,
                             plans_of(trainer_folder), "fg", DEFAULT_FIT_REGION, DEFAULT_MAX_VOXELS, 0, False)
    out = {"shared": {"cases": case_values(fit.after), "temperature": fit.temperature}}
    if vector:
        from ..vector_scaling import calibrate_vector

        record = calibrate_vector(folders, device=device, fallback=False, write=False, progress=False, log=lambda *a: None)
        out["vector"] = {"cases": case_values(record["after"]), "method": record["method"],
                         "vector_scaling": record["vector_scaling"]}
    return out


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


def build_results(cells: list[Cell], baseline: str | None, vector: bool = False, device: str = "cpu") -> dict:
    """Aggregate one dataset's cells into rows per trainer (see the module docstring)."""
    by_trainer: dict[str, list[tuple[Cell, dict | None]]] = defaultdict(list)
    for cell in cells:
        by_trainer[cell.trainer].append((cell, load_cell(cell)))
    missing = [f"{c.label()}: {c.missing_reason()}" for entries in by_trainer.values() for c, d in entries if d is None]
    rows, per_case, reliability, case_rows = {}, {}, {}, []
    for trainer, entries in by_trainer.items():
        done = [(c, d) for c, d in entries if d is not None]
        cases = {s: {case: v for _, d in done for case, v in d["cases"][s].items()} for s in ("before", "after")}
        shared = shared_stages(done, vector, device)
        cases.update({stage: content["cases"] for stage, content in shared.items()})
        per_case[trainer] = cases
        case_rows += [row for _, d in done for row in d["case_rows"]]
        row = {"folds_done": [c.fold for c, _ in done], "folds_missing": [c.fold for c, d in entries if d is None],
               "temperatures": [d["temperature"] for _, d in done], "num_cases": len(cases["before"]),
               "stages": list(cases)}
        if "shared" in shared:
            row["shared_temperature"] = shared["shared"]["temperature"]
        if "vector" in shared:
            row["vector_scaling"] = {k: shared["vector"][k] for k in ("method", "vector_scaling")}
        for s in cases:
            for m in METRICS:
                mean, std, n = mean_std([v.get(m, math.nan) for v in cases[s].values()])
                row[f"{m}_{s}"] = {"mean": mean, "std": std, "n": n}
        rows[trainer] = row
        if done:
            reliability[trainer] = pooled_reliability([d["reliability"]["before"] for _, d in done])
    if baseline in per_case:
        for trainer in rows:
            if trainer == baseline:
                continue
            for s in rows[trainer]["stages"]:
                if s not in per_case[baseline]:
                    continue
                for m in METRICS:
                    rows[trainer][f"{m}_{s}_vs_baseline"] = paired(
                        {c: v.get(m, math.nan) for c, v in per_case[trainer][s].items()},
                        {c: v.get(m, math.nan) for c, v in per_case[baseline][s].items()},
                        HIGHER_IS_BETTER[m],
                    )
    return {"baseline": baseline, "rows": rows, "missing_cells": missing, "per_case": per_case,
            "reliability": reliability, "case_rows": case_rows,
            "failure_detection": failure_detection(case_rows, baseline)}


def failure_detection(case_rows: list[dict], baseline: str | None) -> dict:
    """Per trainer: AURC, E-AURC and AUROC (with bootstrap intervals) of each uncertainty score, before and
    after temperature scaling, on the cases with a defined Dice; τ from the baseline trainer's Dice."""
    from .cases import SCORE_STAGES, SCORES
    from .failure import default_tau, summarise_failure_detection

    if not case_rows:
        return {}
    by_trainer: dict[str, list[dict]] = defaultdict(list)
    for row in case_rows:
        if not math.isnan(row["dice"]):
            by_trainer[row["trainer"]].append(row)
    reference = baseline if baseline in by_trainer else next(iter(by_trainer))
    tau = default_tau([r["dice"] for r in by_trainer[reference]])
    out = {"tau": tau, "tau_from": f"10th percentile of {reference}'s per-case Dice ({len(by_trainer[reference])} cases)"}
    for trainer, rows in by_trainer.items():
        usable = [r for r in rows if all(not math.isnan(r[f"{s}_{st}"]) for s in SCORES for st in SCORE_STAGES)]
        if len(usable) < 2:
            out[trainer] = {"n_cases": len(usable), "note": "fewer than 2 cases with every score defined"}
            continue
        scores = {f"{s}_{st}": [r[f"{s}_{st}"] for r in usable] for st in SCORE_STAGES for s in SCORES}
        out[trainer] = summarise_failure_detection([r["dice"] for r in usable], scores, tau)
    return out


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


def stages_present(rows: dict) -> list[str]:
    """The stages some trainer has, in :data:`STAGES` order."""
    return [s for s in STAGES if any(s in row["stages"] for row in rows.values())]


def markdown(dataset: str, results: dict, description: str = "") -> str:
    rows, baseline = results["rows"], results["baseline"]
    header = "| trainer | folds | cases | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "|---|---|---|" + "---|" * len(METRICS)
    out = [f"# Benchmark: {dataset}", ""]
    if description:
        out += [f"Dataset: {description}", ""]
    out += ["Mean ± std over validation cases (per-case metrics, the paper's aggregation); calibration metrics on "
            "foreground voxels (ground truth ≠ 0, the paper's) with 15 bins: ECE (equal-width bins), ECE (adaptive: "
            "equal-mass bins), MCE (largest bin gap), ECE (boundary: voxels within ±2 voxels of a reference label "
            "boundary), classwise ECE, NLL, Brier.", ""]
    for stage in stages_present(rows):
        out += [f"## {STAGE_TITLES[stage]}", "", header, rule]
        for trainer, row in rows.items():
            if stage not in row["stages"]:
                continue
            folds = f"{len(row['folds_done'])}/{len(row['folds_done']) + len(row['folds_missing'])}"
            t = {"after": f" (T={', '.join(f'{x:.2f}' for x in row['temperatures'])})" if row["temperatures"] else "",
                 "shared": f" (T={row.get('shared_temperature', math.nan):.2f})"}.get(stage, "")
            cells = [fmt(row[f"{m}_{stage}"], 2 if m == "hd95" else 4) for m in METRICS]
            out.append(f"| {trainer}{t} | {folds} | {row['num_cases']} | " + " | ".join(cells) + " |")
        out.append("")
        paired_rows = [t for t, row in rows.items() if t != baseline and f"dice_{stage}_vs_baseline" in row]
        if baseline in rows and paired_rows:
            out += [f"Paired difference to {baseline} on the same cases ({STAGE_TITLES[stage].split(' (')[0].lower()}; "
                    "'better' counts cases where the trainer wins; Wilcoxon signed-rank p):", "",
                    "| trainer | " + " | ".join("Δ" + METRIC_TITLES[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
            for trainer in paired_rows:
                out.append(f"| {trainer} | " + " | ".join(
                    fmt_diff(rows[trainer][f"{m}_{stage}_vs_baseline"], 2 if m == "hd95" else 4) for m in METRICS) + " |")
            out.append("")
    out += failure_markdown(results.get("failure_detection", {}))
    if results["missing_cells"]:
        out += ["## Missing cells (not trained or not calibrated yet; rows above use only the finished folds)", ""]
        out += [f"- {m}" for m in results["missing_cells"]] + [""]
    return "\n".join(out)


def failure_markdown(failure: dict) -> list[str]:
    """The failure-detection table: per trainer and score, AURC, E-AURC and AUROC with 95% intervals."""
    if not failure:
        return []
    out = ["## Failure detection: does the uncertainty of a case flag its poor segmentation?", "",
           "Risk = 1 − Dice (mean foreground Dice of the case). Cases ranked by a score (higher = more doubtful): AURC "
           "= mean over k of the mean risk of the k most confident cases (lower is better), E-AURC = AURC minus that "
           f"of the perfect ranking (0 is perfect); AUROC for detecting cases with Dice < τ = {failure['tau']:.4f} "
           f"({failure['tau_from']}). [95% bootstrap interval over cases]", "",
           "| trainer | score | stage | cases (failures) | AURC | E-AURC | AUROC |", "|---|---|---|---|---|---|---|"]

    def ci(stat: dict) -> str:
        value = stat["value"]
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f} [{stat['low']:.4f}, {stat['high']:.4f}]"

    for trainer, summary in failure.items():
        if trainer in ("tau", "tau_from") or "scores" not in summary:
            continue
        for name, stat in summary["scores"].items():
            score, stage = name.rsplit("_", 1)
            stage = "as trained" if stage == "before" else "after T"
            out.append(f"| {trainer} | {score} | {stage} | {summary['n_cases']} ({summary['n_failures']}) | "
                       f"{ci(stat['aurc'])} | {ci(stat['e_aurc'])} | {ci(stat['auroc'])} |")
    return out + [""]


def csv_text(results: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trainer", "stage", "metric", "mean", "std", "n", "diff_vs_baseline", "diff_std", "diff_n", "wins", "p"])
    for trainer, row in results["rows"].items():
        for s in row["stages"]:
            for m in METRICS:
                stat = row[f"{m}_{s}"]
                diff = row.get(f"{m}_{s}_vs_baseline", {"mean": "", "std": "", "n": "", "wins": "", "p": ""})
                writer.writerow([trainer, s, m, stat["mean"], stat["std"], stat["n"],
                                 diff["mean"], diff["std"], diff["n"], diff["wins"], diff["p"]])
    for trainer, summary in results.get("failure_detection", {}).items():
        if trainer in ("tau", "tau_from") or "scores" not in summary:
            continue
        for name, stats in summary["scores"].items():
            for metric in ("aurc", "e_aurc", "auroc"):
                writer.writerow([trainer, "failure_detection", f"{metric}:{name}", stats[metric]["value"],
                                 stats[metric]["low"], stats[metric]["high"], "", "", summary["n_cases"], "", ""])
    return buffer.getvalue()


def plot_risk_coverage_of(results: dict, path: Path, dataset: str) -> None:
    """risk_coverage.png: every trainer's risk-coverage curve for both entropy scores, as trained."""
    from .cases import SCORES
    from .failure import plot_risk_coverage, risk_coverage

    curves = {}
    for trainer in results["rows"]:
        rows = [r for r in results["case_rows"] if r["trainer"] == trainer and not math.isnan(r["dice"])]
        for score in SCORES:
            values = [(1 - r["dice"], r[f"{score}_before"]) for r in rows if not math.isnan(r[f"{score}_before"])]
            if len(values) >= 2:
                risk, uncertainty = zip(*values)
                curves[f"{trainer}: {score}"] = risk_coverage(np.array(risk), np.array(uncertainty))
    if curves:
        plot_risk_coverage(curves, path, f"{dataset}: risk (1 - Dice) of the most confident cases, as trained")


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
    """results.{md,csv,json}, cases.csv, reliability.png (all trainers overlaid), ece_vs_dice.png and
    risk_coverage.png."""
    from ..calibration.reliability import plot_reliability
    from .cases import write_cases_csv

    out_folder.mkdir(parents=True, exist_ok=True)
    write_cases_csv(results["case_rows"], out_folder / "cases.csv")
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
    plot_risk_coverage_of(results, out_folder / "risk_coverage.png", dataset)
    return out_folder / "results.md"
