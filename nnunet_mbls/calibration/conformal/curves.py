"""What one labelled case contributes to conformal calibration: per foreground label, histograms of the label's
probability over the case's voxels and over its reference voxels.

The G bins are equal-width in the logit z = log(p / (1 − p)) over [−Z, Z] (Z = :data:`LOGIT_RANGE`; bin 0 also
holds every p below σ(−Z + Δ), bin G − 1 every p at or above σ(Z − Δ), p = 0 and 1 included), so thresholds are
fine near 0 and 1, where an over-confident model's masks must be cut, and the middle threshold g = G/2 is p = 0.5.
The mask of grid threshold g = 0..G is the union of bins b ≥ g (g = 0: every voxel; g = G: the empty mask), so
suffix sums of the two histograms give each mask's volume and true positives, hence its false-negative rate,
false-discovery rate and volume, exactly: a case costs 2·L·G integers whatever its size, and the probabilities
need not be kept. Voxels with the ignore label are left out of every count. Test cases are binned by the same
:func:`probability_bins`, so a mask applied to a new case is exactly the mask whose risk was calibrated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...io import atomic_write
from .risk import ConformalError

#: bins of the threshold grid (even: the middle threshold is p = 0.5)
GRID = 1000
#: the grid spans logits [-Z, Z]: probabilities from 1.1e-7 to 1 - 1.1e-7 (float32's resolution near 1)
LOGIT_RANGE = 16.0


def probability_bins(p: np.ndarray, grid: int = GRID) -> np.ndarray:
    """The grid bin of each probability: floor((logit(p) + Z) / (2Z / G)), clipped to 0..G − 1."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        z = np.log(p) - np.log1p(-p)
    return np.clip(np.floor((z + LOGIT_RANGE) * (grid / (2 * LOGIT_RANGE))), 0, grid - 1).astype(np.int32)


def threshold_of(g: int, grid: int = GRID) -> float:
    """The probability threshold of grid index ``g``: 0 for g = 0 (every voxel), σ(−Z + 2Zg/G) inside, and above 1
    (the empty mask, written as 1.0 in records) for g = G."""
    if g <= 0:
        return 0.0
    if g >= grid:
        return 1.0
    return float(1.0 / (1.0 + np.exp(LOGIT_RANGE - 2 * LOGIT_RANGE * g / grid)))


def mask_at(p: np.ndarray, g: int, grid: int = GRID) -> np.ndarray:
    """The mask of grid threshold ``g`` (0: every voxel; G: none; else p ≥ :func:`threshold_of`), as the calibration
    counted it."""
    return probability_bins(p, grid) >= g


def suffix_sums(counts: np.ndarray) -> np.ndarray:
    """(..., G) histogram -> (..., G+1) counts in bins ≥ g for g = 0..G (the last is 0)."""
    counts = np.asarray(counts, dtype=np.int64)
    zero = np.zeros(counts.shape[:-1] + (1,), dtype=np.int64)
    return np.concatenate([np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1], zero], axis=-1)


@dataclass
class CaseCurves:
    """Per-label probability histograms of one case (see the module docstring).

    ``counts[l, b]``: voxels whose probability of ``labels[l]`` falls in bin b; ``reference_counts[l, b]``: those of
    them whose reference label is ``labels[l]``; ``voxel_ml``: the volume of one voxel (ml); ``dice``: the Dice of
    the case's segmentation per label (NaN when neither reference nor segmentation holds it); ``scores``: the
    case's QC scores (``mean_entropy_fg``, ...), for the acceptance rule.
    """

    case: str
    labels: tuple[int, ...]
    counts: np.ndarray
    reference_counts: np.ndarray
    voxel_ml: float
    dice: np.ndarray
    scores: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return int(self.counts.shape[1])

    def mask_voxels(self) -> np.ndarray:
        """(L, G+1) voxels in the mask of each grid threshold."""
        return suffix_sums(self.counts)

    def true_positives(self) -> np.ndarray:
        """(L, G+1) reference voxels inside the mask of each grid threshold."""
        return suffix_sums(self.reference_counts)

    def reference_voxels(self) -> np.ndarray:
        """(L,) reference voxels of each label."""
        return self.reference_counts.sum(axis=1)

    def false_negative_rate(self) -> np.ndarray:
        """(L, G+1) fraction of the reference outside each mask; NaN for a label the reference lacks."""
        total = self.reference_voxels()[:, None].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, 1.0 - self.true_positives() / np.maximum(total, 1), np.nan)

    def false_discovery_rate(self) -> np.ndarray:
        """(L, G+1) fraction of each mask outside the reference; 0 for an empty mask (nothing wrongly included)."""
        mask = self.mask_voxels().astype(np.float64)
        return np.where(mask > 0, (mask - self.true_positives()) / np.maximum(mask, 1), 0.0)

    def save(self, path: str | Path) -> Path:
        """Write the curves as one ``.npz`` (atomically)."""
        header = json.dumps({"case": self.case, "labels": list(self.labels), "voxel_ml": self.voxel_ml,
                             "scores": self.scores})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, header=np.array(header), counts=self.counts, reference_counts=self.reference_counts,
                                    dice=self.dice)
        return atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> "CaseCurves":
        """Read curves written by :meth:`save`."""
        try:
            with np.load(path) as data:
                header = json.loads(str(data["header"]))
                return cls(header["case"], tuple(header["labels"]), data["counts"], data["reference_counts"],
                           float(header["voxel_ml"]), data["dice"], header["scores"])
        except Exception as e:
            raise ConformalError(f"cannot read conformal curves {path} ({type(e).__name__}: {e}); delete it and rerun "
                                 f"nnunet-mbls conformal") from e


def label_histograms(probabilities: np.ndarray, reference: np.ndarray, labels: Sequence[int],
                     ignore_label: int | None = None, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of each label's probability over the voxels and over its reference voxels.

    Args:
        probabilities: (C, *spatial) probabilities, channel c = label c.
        reference: (*spatial) integer reference labels.
        labels: the foreground labels to count.
        ignore_label: voxels with this reference label are left out.
        grid: G, the number of bins.

    Returns:
        ``counts`` and ``reference_counts``, each (len(labels), G) int64.
    """
    if probabilities.shape[1:] != reference.shape:
        raise ConformalError(f"probabilities {probabilities.shape} and reference {reference.shape} differ in shape")
    keep = None if ignore_label is None else reference != ignore_label
    counts = np.zeros((len(labels), grid), dtype=np.int64)
    reference_counts = np.zeros_like(counts)
    for i, label in enumerate(labels):
        p, ref = probabilities[label], reference == label
        if keep is not None:
            p, ref = p[keep], ref[keep]
        bins = probability_bins(p, grid).ravel()
        counts[i] = np.bincount(bins, minlength=grid)
        reference_counts[i] = np.bincount(bins[ref.ravel()], minlength=grid)
    return counts, reference_counts


def dice_per_label(segmentation: np.ndarray, reference: np.ndarray, labels: Sequence[int],
                   ignore_label: int | None = None) -> np.ndarray:
    """(L,) Dice per label with nnU-Net's own tp/fp/fn counting (ignore voxels left out); NaN where both are empty."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    ignore = None if ignore_label is None else reference == ignore_label
    dice = np.full(len(labels), np.nan)
    for i, label in enumerate(labels):
        tp, fp, fn, _ = compute_tp_fp_fn_tn(reference == label, segmentation == label, ignore)
        if tp + fp + fn:
            dice[i] = 2.0 * tp / (2 * tp + fp + fn)
    return dice


def case_curves(case: str, probabilities: np.ndarray, reference: np.ndarray, labels: Sequence[int], voxel_ml: float,
                ignore_label: int | None = None, scores: Mapping[str, float] | None = None,
                grid: int = GRID) -> CaseCurves:
    """The :class:`CaseCurves` of a case from its probabilities on the reference's grid (its segmentation: argmax)."""
    counts, reference_counts = label_histograms(probabilities, reference, labels, ignore_label, grid)
    dice = dice_per_label(probabilities.argmax(0), reference, labels, ignore_label)
    return CaseCurves(case, tuple(int(v) for v in labels), counts, reference_counts, float(voxel_ml), dice,
                      dict(scores or {}))
