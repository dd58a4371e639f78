"""The paper-style results table of a benchmark, written: ``results.md``/``.csv``/``.json``, ``reliability.png``,
``ece_vs_dice.png`` and ``risk_coverage.png``. The numbers come from :mod:`nnunet_mbls.benchmark.results`."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..io import atomic_write, atomic_write_json, atomic_write_text
from ..plotting import default_style
from .results import METRICS

METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "ece": "ECE", "ece_adaptive": "ECE (adaptive)", "mce": "MCE",
                 "ece_boundary": "ECE (boundary)", "cece": "CECE", "nll": "NLL", "brier": "Brier"}
STAGES = ("before", "after", "shared", "vector")
STAGE_TITLES = {
    "before": "As trained",
    "after": "After temperature scaling (T fitted per fold on its validation cases)",
    "shared": "After one temperature shared by the folds (fitted on their pooled out-of-fold cases: the calibrated ensemble)",
    "vector": "After vector scaling shared by the folds (per-class scale and bias on the logits, pooled out-of-fold fit)",
}


def fmt(stat: dict, digits: int = 4) -> str:
    """A table cell ``mean ± std``.

    Args:
        stat: ``{"mean", "std", "n"}`` of one metric (:func:`~nnunet_mbls.benchmark.results.mean_std`).
        digits: decimals (default 4).

    Returns:
        ``"n/a"`` when there is no value; the mean alone when the std is NaN.
    """
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "n/a"
    std = "" if math.isnan(stat["std"]) else f" ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{std}"


def fmt_diff(stat: dict, digits: int = 4) -> str:
    """A table cell of a paired difference: ``+mean (wins/n better, p=...)``.

    Args:
        stat: the result of :func:`~nnunet_mbls.benchmark.results.paired`.
        digits: decimals of the mean (default 4).

    Returns:
        ``"n/a"`` when no case is common; the p-value is left out when it is NaN.
    """
    if stat["n"] == 0:
        return "n/a"
    p = "" if math.isnan(stat["p"]) else f", p={stat['p']:.2g}"
    return f"{stat['mean']:+.{digits}f} ({stat['wins']}/{stat['n']} better{p})"


def stages_present(rows: dict) -> list[str]:
    """The stages some trainer has, in :data:`STAGES` order.

    Args:
        rows: ``results["rows"]``: trainer -> row with ``stages``.

    Returns:
        The stage names.
    """
    return [s for s in STAGES if any(s in row["stages"] for row in rows.values())]


def markdown(dataset: str, results: dict, description: str = "") -> str:
    """The text of ``results.md``: one table per stage, the paired differences to the baseline, failure
    detection and the missing cells.

    Args:
        dataset: the dataset name, for the title.
        results: the output of :func:`~nnunet_mbls.benchmark.results.build_results`.
        description: the dataset's description (dataset.json), shown under the title when not empty.

    Returns:
        Markdown text.
    """
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
    out += conformal_lines(results.get("conformal", {}))
    if results["missing_cells"]:
        out += ["## Missing cells (not trained or not calibrated yet; rows above use only the finished folds)", ""]
        out += [f"- {m}" for m in results["missing_cells"]] + [""]
    return "\n".join(out)


def failure_markdown(failure: dict) -> list[str]:
    """The failure-detection table: per trainer and score, AURC, E-AURC and AUROC with 95% intervals.

    Args:
        failure: ``results["failure_detection"]`` (:func:`~nnunet_mbls.benchmark.results.failure_detection`).

    Returns:
        Markdown lines; [] when ``failure`` is empty. Trainers with fewer than 2 usable cases are left out.
    """
    if not failure:
        return []
    out = ["## Failure detection: does the uncertainty of a case flag its poor segmentation?", "",
           "Risk = 1 − Dice (mean foreground Dice of the case). Cases ranked by a score (higher = more doubtful): AURC "
           "= mean over k of the mean risk of the k most confident cases (lower is better), E-AURC = AURC minus that "
           "of the perfect ranking (0 is perfect), AUGRC = mean over k of the k most confident cases' summed risk / n "
           "(the generalized risk of Traub et al. 2024: a failure counts as often as it is accepted); "
           f"AUROC for detecting cases with Dice < τ = {failure['tau']:.4f} "
           f"({failure['tau_from']}). [95% bootstrap interval over cases]", "",
           "| trainer | score | stage | cases (failures) | AURC | E-AURC | AUGRC | AUROC |", "|---|---|---|---|---|---|---|---|"]

    def ci(stat: dict) -> str:
        """``value [low, high]``, or ``n/a`` when the value is undefined."""
        value = stat["value"]
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f} [{stat['low']:.4f}, {stat['high']:.4f}]"

    for trainer, summary in failure.items():
        if trainer in ("tau", "tau_from") or "scores" not in summary:
            continue
        for name, stat in summary["scores"].items():
            score, stage = name.rsplit("_", 1)
            stage = "as trained" if stage == "before" else "after T"
            out.append(f"| {trainer} | {score} | {stage} | {summary['n_cases']} ({summary['n_failures']}) | "
                       f"{ci(stat['aurc'])} | {ci(stat['e_aurc'])} | {ci(stat['augrc'])} | {ci(stat['auroc'])} |")
    return out + [""]


def conformal_lines(conformal: dict) -> list[str]:
    """The conformal-guarantees section of ``results.md`` (:mod:`~nnunet_mbls.benchmark.conformal`)."""
    from .conformal import MEASURES

    if not conformal:
        return []
    any_stage = next((s for t in conformal.values() for s in t.values() if "alpha" in s), None)
    out = ["## Conformal guarantees: how tight are they?", ""]
    if any_stage is not None:
        out += [f"Rules of `nnunet-mbls conformal` fitted at α = {any_stage['alpha']:g} on each trainer's out-of-fold "
                f"cases (means over labels; smaller is tighter at the same guarantee); accepted: the fraction of cases "
                f"the acceptance rule on mean_entropy_fg accepts with ≤ 10% failures (Dice < {any_stage['failure_dice']:.4f}) "
                f"at δ = 0.1. [95% bootstrap interval over cases, rules refitted]", ""]
    out += ["| trainer | stage | cases | " + " | ".join(d for d, _ in MEASURES.values()) + " | accepted |",
            "|---|---|---|" + "---|" * (len(MEASURES) + 1)]
    for trainer, stages in conformal.items():
        for stage, stat in stages.items():
            title = {"before": "as trained", "after": "after T (each fold's)", "shared": "after shared T"}[stage]
            if "note" in stat:
                out.append(f"| {trainer} | {title} | {stat['n_cases']} | " + " | ".join(["n/a"] * (len(MEASURES) + 1))
                           + f" |  <!-- {stat['note']} -->")
                continue
            values = [stat[m] for m in (*MEASURES, "accepted_fraction")]
            out.append(f"| {trainer} | {title} | {stat['n_cases']} | " + " | ".join(
                "n/a" if math.isnan(v["value"]) else f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                for v in values) + " |")
    return out + [""]


def csv_text(results: dict) -> str:
    """The text of ``results.csv``: one row per (trainer, stage, metric), then the failure-detection values.

    Args:
        results: the output of :func:`~nnunet_mbls.benchmark.results.build_results`.

    Returns:
        CSV text with the columns trainer, stage, metric, mean, std, n, diff_vs_baseline, diff_std, diff_n,
        wins, p (failure-detection rows: the value, the interval's low and high as mean, std and n, and the
        number of cases as diff_n).
    """
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
            for metric in ("aurc", "e_aurc", "augrc", "auroc"):
                writer.writerow([trainer, "failure_detection", f"{metric}:{name}", stats[metric]["value"],
                                 stats[metric]["low"], stats[metric]["high"], "", "", summary["n_cases"], "", ""])
    for trainer, stages in results.get("conformal", {}).items():
        for stage, stat in stages.items():
            for name, value in stat.items():
                if isinstance(value, dict):
                    writer.writerow([trainer, f"conformal_{stage}", name, value["value"], value["low"], value["high"],
                                     "", "", stat["n_cases"], "", ""])
    return buffer.getvalue()


def plot_risk_coverage_of(results: dict, path: Path, dataset: str) -> None:
    """risk_coverage.png: every trainer's risk-coverage curve for both entropy scores, as trained.

    Cases with NaN Dice or score are left out; a curve needs at least 2 cases, and nothing is written
    when no curve has them.

    Args:
        results: the output of :func:`~nnunet_mbls.benchmark.results.build_results` (its ``case_rows``).
        path: the PNG to write.
        dataset: the dataset name, for the title.
    """
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
    """ece_vs_dice.png: foreground ECE against Dice per case (dots) and per trainer mean (diamonds), as trained.

    Args:
        results: the output of :func:`~nnunet_mbls.benchmark.results.build_results` (its ``per_case``).
        path: the PNG to write (atomically).
        dataset: the dataset name, for the title.
    """
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
    """Write results.{md,csv,json}, cases.csv, reliability.png (all trainers overlaid), ece_vs_dice.png and
    risk_coverage.png.

    reliability.png and ece_vs_dice.png are drawn only when some trainer has a reliability curve;
    risk_coverage.png only when some curve has 2 cases (see :func:`plot_risk_coverage_of`).

    Args:
        dataset: the dataset name.
        results: the output of :func:`~nnunet_mbls.benchmark.results.build_results`.
        out_folder: the folder to write into (created if needed).
        description: the dataset's description, for ``results.md``.

    Returns:
        The path of ``results.md``.
    """
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
