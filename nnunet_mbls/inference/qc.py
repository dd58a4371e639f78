"""Per-case quality-control scores of a segmentation and its probabilities, and the rule that flags cases.

One function, :func:`case_scores`, computes every score from a case's label map and probabilities on the
image grid; ``nnunet-mbls predict``/``maps`` (``qc.csv``) and the benchmark's failure detection
(``cases.csv``) both call it, so a score means the same everywhere.

Scores (each column of ``qc.csv``):

- ``volume_ml_<label>``: predicted volume per foreground label, voxel count × voxel volume (the image
  spacing; for 2D images, whose first spacing nnU-Net sets to 999, the pixel area × 1 mm);
- ``mean_entropy_fg``: mean predictive entropy (nats) over the voxels predicted as foreground;
- ``mean_entropy_boundary``: mean entropy in the band of ±``boundary_width`` voxels around the predicted
  label boundaries (the same band as the calibration region ``boundary``);
- ``mean_fold_dice``: with ≥ 2 folds, the mean pairwise Dice between the folds' segmentations (the
  failure detector of Zenk et al., MedIA 2025), on the network's grid inside nnU-Net's crop box.

Higher entropy and lower fold Dice mean a more doubtful case. A score that cannot be computed (no
foreground predicted) is NaN, and a NaN score is flagged.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..calibration.regions import region_mask
from ..io import atomic_write_json, atomic_write_text
from . import SCORE_DIRECTION
from .uncertainty import entropy

#: the spacing nnU-Net gives the fake first axis of 2D images
SPACING_2D_MARKER = 999
DEFAULT_BOUNDARY_WIDTH = 2


@dataclass(frozen=True)
class FlagRule:
    """Flag a case when ``score`` is beyond ``threshold`` (above for entropies, below for Dice) or NaN.

    ``threshold`` None flags every case (an acceptance rule that certified no threshold); ``guarantee`` is the
    statement of a conformal acceptance rule (``nnunet-mbls conformal``), written into ``qc.json``.
    """

    score: str
    threshold: float | None
    guarantee: str | None = None

    def __post_init__(self) -> None:
        if self.score not in SCORE_DIRECTION:
            raise ValueError(f"flag score {self.score!r} is unknown; choose one of {', '.join(SCORE_DIRECTION)}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"flag threshold must be a finite number, got {self.threshold!r}")

    def flags(self, scores: Mapping[str, float]) -> bool:
        """Whether a case is flagged.

        Args:
            scores: the case's scores (:func:`case_scores`), holding :attr:`score`.

        Returns:
            True when the score is beyond the threshold (above for entropies, below for Dice) or NaN, or when
            there is no threshold.
        """
        value = float(scores[self.score])
        if math.isnan(value) or self.threshold is None:
            return True
        return value > self.threshold if SCORE_DIRECTION[self.score] else value < self.threshold

    def describe(self) -> str:
        """The rule as one sentence, for ``qc.json`` (e.g. ``flag = 1 when mean_entropy_fg > 0.3 or ...``)."""
        if self.threshold is None:
            text = f"flag = 1 for every case: no threshold of {self.score} is certified"
        else:
            op = ">" if SCORE_DIRECTION[self.score] else "<"
            text = f"flag = 1 when {self.score} {op} {self.threshold:g} or when it cannot be computed (NaN)"
        return text + (f"; guarantee of the accepted (flag = 0) cases: {self.guarantee}" if self.guarantee else "")


def default_flag_rule(num_folds: int) -> FlagRule:
    """Fold disagreement when there is an ensemble, else the mean entropy over the predicted foreground.

    The thresholds are starting points, not universal constants: tune them on your validation cases (the
    benchmark's ``cases.csv`` lists every score next to the Dice of each case). The entropy threshold and the
    choice of the foreground over the boundary entropy come from the demo's 40 out-of-fold cases
    (docs/BENCHMARKS.md, section 4): the boundary entropy depends on how much of an image is boundary, so it
    ranks cases but has no portable threshold.

    Args:
        num_folds: the number of folds that predict.

    Returns:
        ``FlagRule("mean_fold_dice", 0.8)`` with 2 or more folds, else ``FlagRule("mean_entropy_fg", 0.3)``.
    """
    return FlagRule("mean_fold_dice", 0.8) if num_folds >= 2 else FlagRule("mean_entropy_fg", 0.3)


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Voxel volume in ml of nnU-Net spacing; the 2D marker axis (spacing 999) counts as 1 mm.

    Args:
        spacing: mm per axis, in nnU-Net's array order (the properties' ``spacing``).

    Returns:
        The product of the spacings / 1000.
    """
    mm = [1.0 if float(s) == SPACING_2D_MARKER else float(s) for s in spacing]
    return float(np.prod(mm)) / 1000.0


def case_scores(segmentation: np.ndarray, probabilities: np.ndarray, spacing: Sequence[float],
                foreground: Mapping[int, str], boundary_width: int = DEFAULT_BOUNDARY_WIDTH,
                fold_dice: float | None = None, entropy_map: np.ndarray | None = None) -> dict[str, float]:
    """Scores of one case on the image grid (see the module docstring).

    Args:
        segmentation: (*spatial) integer label map.
        probabilities: (C, *spatial) softmax probabilities of the same case.
        spacing: mm per axis of ``segmentation`` (nnU-Net's properties ``spacing``).
        foreground: label value -> name of every foreground label.
        boundary_width: half-width in voxels of the band around the predicted label boundaries (default 2).
        fold_dice: the mean pairwise fold Dice, when the case was predicted by ≥ 2 folds.
        entropy_map: (*spatial) entropy of ``probabilities`` when already computed.

    Returns:
        ``volume_ml_<name>`` per foreground label, ``mean_entropy_fg``, ``mean_entropy_boundary`` (NaN where
        the region is empty) and, with ``fold_dice``, ``mean_fold_dice``.

    Raises:
        ValueError: ``probabilities`` and ``segmentation`` differ in spatial shape.
    """
    if probabilities.shape[1:] != segmentation.shape:
        raise ValueError(f"probabilities {probabilities.shape} and segmentation {segmentation.shape} differ in shape")
    h = entropy(probabilities) if entropy_map is None else entropy_map
    volume = voxel_volume_ml(spacing)
    scores = {f"volume_ml_{name}": int(np.count_nonzero(segmentation == label)) * volume
              for label, name in foreground.items()}
    predicted = segmentation != 0
    band = region_mask(segmentation.astype(np.int64, copy=False), "boundary", boundary_width=boundary_width)
    scores["mean_entropy_fg"] = float(h[predicted].mean()) if predicted.any() else math.nan
    scores["mean_entropy_boundary"] = float(h[band].mean()) if band.any() else math.nan
    if fold_dice is not None:
        scores["mean_fold_dice"] = float(fold_dice)
    return scores


def write_qc_table(rows: Mapping[str, Mapping[str, float]], rule: FlagRule, out_folder: str | os.PathLike,
                   settings: Mapping) -> Path:
    """Write ``qc.csv`` (one row per case, the scores and ``flag``) and ``qc.json`` (settings, rule, rows).

    Args:
        rows: case -> its scores (:func:`case_scores`); a score a case lacks is written as NaN.
        rule: the flag rule.
        out_folder: the folder to write both files into (each atomically).
        settings: what produced the scores (command, model, maps, ...), stored in ``qc.json``.

    Returns:
        The path of ``qc.csv``.
    """
    out = Path(out_folder)
    flagged = {case: rule.flags(scores) for case, scores in rows.items()}
    columns = list(dict.fromkeys(k for scores in rows.values() for k in scores))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", *columns, "flag"])
    for case, scores in rows.items():
        writer.writerow([case, *(scores.get(k, math.nan) for k in columns), int(flagged[case])])
    atomic_write_text(out / "qc.csv", buffer.getvalue())
    atomic_write_json(out / "qc.json", {
        "settings": dict(settings), "flag_rule": rule.describe(),
        "scores": {"volume_ml_<label>": "predicted volume per foreground label (ml)",
                   "mean_entropy_fg": "mean predictive entropy (nats) over the predicted foreground",
                   "mean_entropy_boundary": "mean predictive entropy (nats) within the band around predicted boundaries",
                   "mean_fold_dice": "mean pairwise Dice between the folds' segmentations (network grid, crop box)",
                   "volume_ml_<label>_low/_high": "conformal volume interval (ml), with --conformal-json"},
        "num_flagged": sum(flagged.values()),
        "cases": {case: dict(scores, flag=flagged[case]) for case, scores in rows.items()},
    })
    return out / "qc.csv"
