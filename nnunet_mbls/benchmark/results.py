"""The numbers of a benchmark's results table: aggregation over cases, paired differences, the shared-T and
vector-scaling stages, failure detection (the tables and plots are written by :mod:`nnunet_mbls.benchmark.report`).

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

import json
import math
from collections import defaultdict

import numpy as np

from ..defaults import FIT_REGION, MAX_VOXELS, METRIC_REGION, SEED
from ..errors import InputError
from ..layout import FoldFolder
from .grid import Cell

METRICS = ("dice", "hd95", "ece", "ece_adaptive", "mce", "ece_boundary", "cece", "nll", "brier")
#: which direction is better, for "wins" counts
HIGHER_IS_BETTER = {m: m == "dice" for m in METRICS}


def case_values(evaluation: dict) -> dict[str, dict[str, float]]:
    """case -> metric -> value; Dice and HD95 are averaged over the foreground classes of the case.

    Args:
        evaluation: an evaluation record (``evaluation_before.json``/``evaluation_after.json``) with ``per_case``.

    Returns:
        case -> {dice, hd95, ece, ece_adaptive, mce, cece, nll, brier}; NaN for a missing metric, and for
        Dice/HD95 when every class is NaN.
    """
    out = {}
    for case, m in evaluation["per_case"].items():
        row = {k: float(m.get(k, math.nan)) for k in ("ece", "ece_adaptive", "mce", "cece", "nll", "brier")}
        for key in ("dice", "hd95"):
            values = [v for v in m[key].values() if not math.isnan(v)]
            row[key] = float(np.mean(values)) if values else math.nan
        out[case] = row
    return out


#: the per-case entries of an evaluation that do not depend on the temperature
SEGMENTATION_KEYS = ("dice", "hd95", "empty_reference", "empty_prediction")


def load_cell(cell: Cell) -> dict | None:
    """The calibration outputs of one cell, or None when its calibration step has not run.

    Args:
        cell: the cell.

    Returns:
        ``temperature``, ``cases`` (stage -> case -> metrics, with ``ece_boundary`` where the case rows
        exist), ``case_rows`` (:func:`~nnunet_mbls.benchmark.cases.cell_case_rows`) and ``reliability``
        (stage -> curve); None without ``calibration.json``.

    Raises:
        InputError: ``calibration.json`` holds vector scaling (no temperature of the fold), naming the command
            that redoes the temperature step.
    """
    from .cases import cell_case_rows

    fold = FoldFolder.at(cell.folder)
    if not fold.calibration_record.is_file():
        return None
    calibration = json.loads(fold.calibration_record.read_text())
    if "region_temperatures" in calibration:
        raise InputError(f"{fold.path} is a region-based model (per-region temperatures); the benchmark compares "
                         f"softmax calibration. Its per-region ECE before and after T is in {fold.calibration_record}")
    if "temperature" not in calibration:
        raise InputError(
            f"{fold.calibration_record} holds {calibration.get('checkpoint_calibration') or 'another calibration'} "
            f"(nnunet-mbls calibrate --method vector), not the fold's own temperature the benchmark compares; redo "
            f"the temperature step with {fold.calibrate_command()} (the benchmark's --vector-scaling fits vector "
            f"scaling itself, writing nothing into the folds)")
    stages = {s: json.loads((fold.calibration_details / f"evaluation_{s}.json").read_text()) for s in ("before", "after")}
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
    """The ``shared`` (and ``vector``) stages: one temperature (and optionally one vector scaling) shared by a
    trainer's finished folds, fitted on their pooled out-of-fold cases.

    Nothing is written into the folds (the benchmark only measures).

    Args:
        done: (cell, :func:`load_cell` output) of each finished fold of one trainer.
        vector: also fit and evaluate vector scaling (without the fallback to temperature).
        device: the device of the vector-scaling fit.

    Returns:
        Stage -> {"cases": case -> metrics, ...} (``shared`` also holds ``temperature``; ``vector`` its
        ``method`` and ``vector_scaling``); {} with fewer than 2 folds or without their validation
        probabilities.
    """
    from ..calibration.folds import calibrate_vector
    from ..calibration.folds.step import fit_on_folds

    folders = [c.folder for c, _ in done]
    if len(folders) < 2 or any(not d["case_rows"] for _, d in done):
        return {}
    segmentation = {}  # Dice and HD95 of each case, from its fold's evaluation (the shared T changes no argmax)
    for folder in folders:
        evaluation = json.loads((FoldFolder.at(folder).calibration_details / "evaluation_before.json").read_text())
        segmentation.update({case: {k: m[k] for k in SEGMENTATION_KEYS} for case, m in evaluation["per_case"].items()})
    fit, _ = fit_on_folds(folders, [None] * len(folders), METRIC_REGION, FIT_REGION, MAX_VOXELS, SEED, False,
                          segmentation=segmentation)
    out = {"shared": {"cases": case_values(fit.after), "temperature": fit.temperature}}
    if vector:
        record = calibrate_vector(folders, device=device, fallback=False, write=False, progress=False, log=lambda *a: None)
        out["vector"] = {"cases": case_values(record["after"]), "method": record["method"],
                         "vector_scaling": record["vector_scaling"]}
    return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation over the non-NaN values.

    Args:
        values: one value per case (NaN for undefined).

    Returns:
        ``(mean, std, n)``: std with ddof=1 (NaN for n = 1); ``(nan, nan, 0)`` without a value.
    """
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, 0
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan, len(finite)


def paired(a: dict[str, float], b: dict[str, float], higher_is_better: bool) -> dict:
    """Difference a − b over common cases: mean, std, n, wins of a, Wilcoxon p.

    Args:
        a: case -> value of the trainer.
        b: case -> value of the baseline.
        higher_is_better: whether a win is a positive difference (Dice) or a negative one.

    Returns:
        ``{"mean", "std", "n", "wins", "p"}`` over the cases where both values are defined: std with ddof=1
        (NaN for n = 1), p the two-sided Wilcoxon signed-rank p-value (NaN with fewer than 2 cases or all
        differences 0); mean, std and p NaN and n 0 without a common case.
    """
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
    """Sum per-bin counts over folds; confidence/accuracy become count-weighted means.

    Args:
        curves: non-empty list of reliability curves with the same bins (one per fold).

    Returns:
        One curve: the first curve's ``bin_lower``/``bin_upper``, summed ``count``, weighted ``confidence`` and
        ``accuracy`` (NaN where the summed count is 0).
    """
    count = np.sum([np.asarray(c["count"], float) for c in curves], axis=0)
    out = {"bin_lower": curves[0]["bin_lower"], "bin_upper": curves[0]["bin_upper"], "count": count}
    for key in ("confidence", "accuracy"):
        weighted = np.sum([np.nan_to_num(np.asarray(c[key], float)) * np.asarray(c["count"], float) for c in curves], axis=0)
        out[key] = np.where(count > 0, weighted / np.maximum(count, 1), np.nan)
    return out


def build_results(cells: list[Cell], baseline: str | None, vector: bool = False, device: str = "cpu",
                  conformal_alpha: float | None = None) -> dict:
    """Aggregate one dataset's cells into rows per trainer (see the module docstring).

    Args:
        cells: the cells of one dataset; unfinished ones are listed as missing.
        baseline: the trainer the others are compared with (paired differences, τ of failure detection);
            None or absent: no paired differences, and τ comes from the first trainer.
        vector: add the ``vector`` stage (default False).
        device: the device of the vector-scaling fit and the conformal curves (default ``"cpu"``).
        conformal_alpha: measure the conformal guarantees at this α (:mod:`~nnunet_mbls.benchmark.conformal`: one
            more validation pass per fold and stage); None (default): not measured.

    Returns:
        ``baseline``, ``rows`` (trainer -> folds, temperatures, per stage and metric ``{mean, std, n}``, and
        ``<metric>_<stage>_vs_baseline``), ``missing_cells``, ``per_case``, ``reliability`` (pooled, as
        trained), ``case_rows``, ``failure_detection`` and, with ``conformal_alpha``, ``conformal``.
    """
    by_trainer: dict[str, list[tuple[Cell, dict | None]]] = defaultdict(list)
    for cell in cells:
        by_trainer[cell.trainer].append((cell, load_cell(cell)))
    missing = [f"{c.label()}: {c.missing_reason()}" for entries in by_trainer.values() for c, d in entries if d is None]
    rows, per_case, reliability, case_rows, finished = {}, {}, {}, [], {}
    for trainer, entries in by_trainer.items():
        done = [(c, d) for c, d in entries if d is not None]
        finished[trainer] = [c for c, _ in done]
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
    failure = failure_detection(case_rows, baseline)
    results = {"baseline": baseline, "rows": rows, "missing_cells": missing, "per_case": per_case,
               "reliability": reliability, "case_rows": case_rows, "failure_detection": failure}
    if conformal_alpha is not None and failure:
        from .conformal import conformal_of_trainer

        results["conformal"] = {trainer: conformal_of_trainer(done, rows[trainer].get("shared_temperature"),
                                                              conformal_alpha, failure["tau"], device)
                                for trainer, done in finished.items() if done}
    return results


def failure_detection(case_rows: list[dict], baseline: str | None) -> dict:
    """Per trainer: AURC, E-AURC and AUROC (with bootstrap intervals) of each uncertainty score, before and
    after temperature scaling, on the cases with a defined Dice; τ from the baseline trainer's Dice.

    Args:
        case_rows: the rows of :func:`~nnunet_mbls.benchmark.cases.cell_case_rows` of every cell.
        baseline: the trainer whose Dice gives τ; when it has no case, the first trainer's is used.

    Returns:
        ``tau``, ``tau_from`` (a sentence) and trainer ->
        :func:`~nnunet_mbls.benchmark.failure.summarise_failure_detection` output (or ``n_cases`` and a
        ``note`` with fewer than 2 cases whose every score is defined); {} without rows.
    """
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
