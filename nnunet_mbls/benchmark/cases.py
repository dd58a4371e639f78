"""Per (trainer, fold, case) rows of the benchmark: the case's Dice next to its uncertainty scores.

The scores come from the statistics streamed out of the fold's validation export (``validation_statistics/``,
:data:`~nnunet_mbls.calibration.case_statistics.QC_REGIONS`: exact as trained, exact or estimated after T as the
metrics are), or, for folds validated with ``.npz`` only, from the probabilities through
:func:`nnunet_mbls.inference.qc.case_scores`, the function behind ``nnunet-mbls predict``'s QC table, as
trained and after the fold's temperature (``normalize(p ** (1/T))``); the boundary-band ECE of the case
comes from the same pass. Out-of-fold validation cases are predicted by one fold each, so the pairwise
fold Dice of the QC table has no counterpart here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..calibration.metrics import CalibrationAccumulator
from ..calibration.regions import region_mask
from ..calibration.temperature import apply_temperature
from ..calibration.evaluation import LabelInfo, load_probabilities, read_reference, reader_for
from ..inference.qc import case_scores
from ..layout import FoldFolder
from .grid import Cell

#: uncertainty scores of a case (higher = more doubtful), before ("as trained") and after temperature scaling
SCORES = ("mean_entropy_fg", "mean_entropy_boundary")
SCORE_STAGES = ("before", "after")


def mean_foreground_dice(case_metrics: dict) -> float:
    """Mean Dice over the foreground classes of a case (NaN classes, empty in both, left out).

    Args:
        case_metrics: one case's entry of an evaluation's ``per_case``, with ``dice``: class -> Dice.

    Returns:
        The mean, or NaN when every class is NaN.
    """
    values = [v for v in case_metrics["dice"].values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def cell_case_rows(cell: Cell) -> list[dict]:
    """One row per validation case of a calibrated cell; [] when its validation probabilities are gone.

    Args:
        cell: a cell whose calibration step has run (``calibration.json`` and
            ``calibration/evaluation_before.json`` exist).

    Returns:
        Rows with the keys of :data:`CASE_COLUMNS`: trainer, fold, case, mean foreground Dice, and each score
        of :data:`SCORES` and ``ece_boundary`` before and after the fold's temperature.
    """
    from ..calibration.folds import gt_folder_for

    fold = FoldFolder.at(cell.folder)
    calibration = json.loads(fold.calibration_record.read_text())
    evaluation = json.loads((fold.calibration_details / "evaluation_before.json").read_text())
    streamed = [fold.validation_statistics / f"{case}.npz" for case in evaluation["per_case"]]
    if all(f.is_file() for f in streamed):
        rows = streamed_case_rows(cell, streamed, evaluation, calibration["temperature"])
        if rows:
            return rows
    validation = fold.validation
    if not all((validation / f"{case}.npz").is_file() for case in evaluation["per_case"]):
        return []
    dataset_json = json.loads((fold.trainer_folder / "dataset.json").read_text())
    labels = LabelInfo.from_dataset_json(dataset_json)
    foreground = {v: k for v, k in labels.names.items() if v != 0}
    gt = gt_folder_for(fold.path)
    reader = reader_for(dataset_json, next(gt.iterdir()))
    rows = []
    for case, metrics in evaluation["per_case"].items():
        probabilities, properties = load_probabilities(case, validation / f"{case}.npz")
        spacing = properties["spacing"]
        ref, _ = read_reference(case, reader, gt / f"{case}{dataset_json['file_ending']}")
        row = {"trainer": cell.trainer, "fold": cell.fold, "case": case, "dice": mean_foreground_dice(metrics)}
        for stage, probs in (("before", probabilities), ("after", apply_temperature(probabilities, calibration["temperature"]))):
            segmentation = probs.argmax(0)
            scores = case_scores(segmentation, probs, spacing, foreground)
            for score in SCORES:
                row[f"{score}_{stage}"] = scores[score]
            row[f"ece_boundary_{stage}"] = boundary_ece(probs, ref, labels)
        rows.append(row)
    return rows


def streamed_case_rows(cell: Cell, files: list[Path], evaluation: dict, temperature: float) -> list[dict]:
    """:func:`cell_case_rows` from streamed statistics ([] when they lack the score regions)."""
    from ..calibration.after_temperature import accumulator_after, mean_entropy_after
    from ..calibration.case_statistics import CaseStatistics

    rows = []
    for f, (case, metrics) in zip(files, evaluation["per_case"].items()):
        statistics = CaseStatistics.load(f)
        if not statistics.qc:
            return []
        row = {"trainer": cell.trainer, "fold": cell.fold, "case": case, "dice": mean_foreground_dice(metrics)}
        for stage, t in (("before", 1.0), ("after", temperature)):
            row[f"mean_entropy_fg_{stage}"] = mean_entropy_after(statistics.qc["predicted_fg"], t)
            row[f"mean_entropy_boundary_{stage}"] = mean_entropy_after(statistics.qc["predicted_boundary"], t)
            row[f"ece_boundary_{stage}"] = accumulator_after(statistics, t, statistics.qc["reference_boundary"]).compute()["ece"]
        rows.append(row)
    return rows


def boundary_ece(probabilities: np.ndarray, ref: np.ndarray, labels: LabelInfo) -> float:
    """Top-label ECE (15 bins) of the voxels within ±2 voxels of a reference label boundary.

    Args:
        probabilities: (C, *spatial) probabilities of the case.
        ref: (*spatial) reference labels.
        labels: the dataset's labels (number of classes, ignore label; ignored voxels are left out).

    Returns:
        The ECE, or NaN when the band is empty.
    """
    mask = region_mask(ref, "boundary", labels.ignore_label)
    accumulator = CalibrationAccumulator(labels.num_classes)
    accumulator.update(torch.from_numpy(probabilities), torch.from_numpy(np.where(mask, ref, 0)), torch.from_numpy(mask))
    return accumulator.compute()["ece"]


CASE_COLUMNS = ("trainer", "fold", "case", "dice",
                *(f"{score}_{stage}" for stage in SCORE_STAGES for score in (*SCORES, "ece_boundary")))


def write_cases_csv(rows: list[dict], path: Path) -> Path:
    """Write ``cases.csv``: one row per (trainer, fold, case), atomically.

    Args:
        rows: the rows of :func:`cell_case_rows`; missing columns are written empty.
        path: the file to write.

    Returns:
        ``path``.
    """
    import csv
    import io

    from ..io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CASE_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in CASE_COLUMNS})
    return atomic_write_text(path, buffer.getvalue())
