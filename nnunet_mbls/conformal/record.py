"""Fitting ``conformal.json`` from the calibration cases' curves, whatever route produced them."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..calibration.conformal.acceptance import fit_acceptance, score_grid
from ..calibration.conformal.curves import CaseCurves
from ..calibration.conformal.risk import ConformalError, check_alpha
from ..calibration.conformal.rules import RISKS, fit_rules
from ..inference import SCORE_DIRECTION
from ..io import atomic_write_json

#: QC scores an acceptance rule can use here (the fold Dice needs each fold's prediction of a calibration case)
ACCEPTANCE_SCORES = ("mean_entropy_fg", "mean_entropy_boundary")


@dataclass(frozen=True)
class AcceptanceSettings:
    """The acceptance rule asked for: accept on ``score``; a case fails when its mean foreground Dice is below
    ``failure_dice``; at most ``max_failure_rate`` failures among accepted cases, with probability ≥ 1 − ``delta``."""

    score: str = "mean_entropy_fg"
    failure_dice: float = 0.5
    max_failure_rate: float = 0.1
    delta: float = 0.1

    def __post_init__(self) -> None:
        if self.score not in ACCEPTANCE_SCORES:
            raise ConformalError(f"--accept-score {self.score!r}: choose {' or '.join(ACCEPTANCE_SCORES)} (the fold "
                                 f"Dice needs every fold's prediction of each calibration case)")
        if not 0.0 < float(self.failure_dice) <= 1.0:
            raise ConformalError(f"--failure-dice {self.failure_dice!r} must lie in (0, 1] (e.g. 0.5)")
        check_alpha(self.max_failure_rate, "--max-failure-rate")
        check_alpha(self.delta, "--delta")


def case_failed(curves: CaseCurves, failure_dice: float) -> bool:
    """Whether a case failed: its mean Dice over the labels it or its segmentation holds is below ``failure_dice``
    (a case where neither holds any label has nothing to get wrong: not failed)."""
    present = curves.dice[~np.isnan(curves.dice)]
    return bool(present.size) and float(present.mean()) < failure_dice


def fit_and_write(curves: Sequence[CaseCurves], label_names: Mapping[int, str], risks: Sequence[str], alpha: float,
                  acceptance: AcceptanceSettings | None, num_classes: int, source: Mapping,
                  output_file: str | os.PathLike) -> dict:
    """Fit the rules (:func:`~nnunet_mbls.calibration.conformal.rules.fit_rules`) and the acceptance rule on the
    cases' QC scores, and write ``conformal.json`` atomically.

    Args:
        curves: the calibration cases.
        label_names: label value -> name of the labels to calibrate.
        risks: any of ``fnr``, ``fdr``, ``volume``.
        alpha: the risk level.
        acceptance: the acceptance rule to fit, or None.
        num_classes: C, for the entropy's range ln C.
        source: where the cases came from.
        output_file: ``conformal.json``.

    Returns:
        The record written.
    """
    fit = None
    if acceptance is not None:
        higher_is_worse = SCORE_DIRECTION[acceptance.score]
        grid = score_grid(higher_is_worse, math.log(num_classes) if higher_is_worse else 1.0)
        scores = np.array([c.scores.get(acceptance.score, math.nan) for c in curves], dtype=np.float64)
        failed = np.array([case_failed(c, acceptance.failure_dice) for c in curves])
        fit = fit_acceptance(scores, failed, higher_is_worse, acceptance.max_failure_rate, acceptance.delta, grid)
    record = fit_rules(curves, label_names, risks, alpha, fit, asdict(acceptance) if acceptance else None, source)
    record["cases"] = [c.case for c in curves]
    record["output_file"] = str(Path(output_file).resolve())
    atomic_write_json(Path(output_file), record)
    return record


def labels_to_calibrate(dataset_labels: Mapping[str, int], names: Sequence[str] | None) -> dict[int, str]:
    """label value -> name of ``names`` (default: every foreground label of dataset.json)."""
    foreground = {int(v): k for k, v in dataset_labels.items() if k != "ignore" and int(v) != 0}
    if not names:
        return foreground
    by_name = {v: k for k, v in foreground.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConformalError(f"--labels {' '.join(unknown)}: not a foreground label of dataset.json "
                             f"(choose from {', '.join(by_name)})")
    return {by_name[n]: n for n in names}


def summary_lines(record: Mapping) -> list[str]:
    """``conformal.json`` in a few lines for the terminal."""
    lines = [f"{record['num_cases']} calibration cases, alpha {record['alpha']:g}"]
    for name, fit in record["labels"].items():
        parts = []
        if "fnr" in fit:
            parts.append(f"FNR mask p >= {fit['fnr']['threshold']:.3g} (volume x{fit['fnr']['mean_relative_volume']:.2f})")
        if "fdr" in fit:
            parts.append(f"FDR mask p >= {fit['fdr']['threshold']:.3g}")
        if "volume" in fit:
            parts.append(f"volume interval mean width {fit['volume']['mean_width_ml']:.3g} ml")
        lines.append(f"  {name}: " + "; ".join(parts))
    rule = record.get("acceptance")
    if rule is not None:
        lines.append(f"  acceptance: {rule['score']} <= {rule['threshold']:.3g} accepts {rule['num_accepted']} of "
                     f"{rule['num_cases']} cases" if rule["threshold"] is not None else f"  acceptance: {rule['guarantee']}")
    return lines


__all__ = ["AcceptanceSettings", "ACCEPTANCE_SCORES", "RISKS", "fit_and_write", "labels_to_calibrate", "summary_lines"]
