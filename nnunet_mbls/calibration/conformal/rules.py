"""``conformal.json``: conformal masks, volume intervals and an acceptance rule fitted on labelled cases, and
their application to a new case.

Per foreground label (``risks``):

- ``fnr``: the superset mask {p_k ≥ t} whose expected false-negative rate (fraction of the structure outside the
  mask) is ≤ α, by conformal risk control (:func:`~.risk.crc_index`, B = 1). Cases whose reference lacks the
  label are left out, so the guarantee is E[FNR | the structure is present] ≤ α;
- ``fdr``: the subset mask {p_k ≥ t} whose expected false-discovery rate (fraction of the mask outside the
  structure; an empty mask has none) is ≤ α, by conformal risk control on the FDR made non-increasing in t
  (:func:`~.risk.monotone_upper`: an upper bound, so the guarantee is conservative). Every case counts;
- ``volume``: nested masks around the 0.5 threshold, symmetric in the logit: {z_k ≥ s} ⊆ {z_k ≥ −s}; a case's
  score is the smallest s whose two masks bracket its reference volume, and the split-conformal quantile ŝ of
  those scores gives the interval [V(z ≥ ŝ), V(z ≥ −ŝ)] that holds a new case's true volume with probability ≥ 1 − α
  (nested conformal prediction, Gupta, Kuchibhotla, Ramdas, 2022). It uses the probabilities themselves: a
  case whose probabilities are spread around the boundary gets a wide interval, a sharp one a narrow interval,
  and better-calibrated probabilities give tighter intervals for the same guarantee.

All three hold on average over the calibration and test draws, for a new case exchangeable with the calibration
cases (the same population, scanner mix and model), whatever the model. The acceptance rule is
:mod:`~.acceptance`'s.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .acceptance import AcceptanceFit
from .curves import CaseCurves, mask_at, threshold_of
from .risk import ConformalError, check_alpha, conformal_rank, crc_index, monotone_upper

CONFORMAL_VERSION = 1
RISKS = ("fnr", "fdr", "volume")
ASSUMPTION = ("the cases a rule is applied to are exchangeable with the calibration cases: drawn from the same "
              "population (site, scanner, protocol, case mix) and predicted by the same model with the same "
              "settings; the guarantees are marginal (on average over calibration and test cases), not per case")


def risk_tag(risk: str, alpha: float) -> str:
    """``fnr10`` for FNR at α = 0.1: the risk and 100·α, as in mask file names."""
    return f"{risk}{100 * alpha:g}"


def volume_scores(curves: Sequence[CaseCurves], index: int) -> np.ndarray:
    """(n,) each case's nested-interval score of label ``labels[index]``: the smallest k (grid steps) for which
    V(mask at G/2 + k) ≤ reference volume ≤ V(mask at G/2 − k)."""
    scores = []
    for c in curves:
        grid = c.grid
        half = grid // 2
        voxels = c.mask_voxels()[index]
        lower, upper = voxels[half:], voxels[half::-1]
        volume = int(c.reference_voxels()[index])
        scores.append(int(np.argmax((lower <= volume) & (upper >= volume))))
    return np.asarray(scores)


def _fit_label(curves: Sequence[CaseCurves], index: int, name: str, risks: Sequence[str], alpha: float) -> dict:
    grid = curves[0].grid
    result: dict = {"label": int(curves[0].labels[index])}
    reference = np.array([c.reference_voxels()[index] for c in curves], dtype=np.float64)
    present = reference > 0
    if "fnr" in risks:
        if not present.any():
            raise ConformalError(f"label {name!r} is absent from every calibration case's reference, so its FNR cannot "
                                 f"be calibrated: add cases that contain it, or choose the labels with --labels")
        fnr = np.stack([c.false_negative_rate()[index] for c in curves])[present]
        # loss non-increasing in lambda = 1 - threshold: reverse the threshold axis (lambda_k, k = 0..G)
        k = crc_index(fnr[:, ::-1], alpha, 1.0, f"FNR of {name!r}")
        g = grid - k
        masks = np.array([c.mask_voxels()[index, g] for c in curves])[present]
        result["fnr"] = {"grid_index": g, "threshold": threshold_of(g, grid), "num_cases": int(present.sum()),
                         "calibration_risk": float(fnr[:, g].mean()),
                         "mean_relative_volume": float(np.mean(masks / reference[present])),
                         "guarantee": f"E[fraction of the {name} outside the mask | {name} present] <= {alpha:g}"}
    if "fdr" in risks:
        fdr = np.stack([c.false_discovery_rate()[index] for c in curves])
        g = crc_index(monotone_upper(fdr), alpha, 1.0, f"FDR of {name!r}")
        masks = np.array([c.mask_voxels()[index, g] for c in curves])
        result["fdr"] = {"grid_index": g, "threshold": threshold_of(g, grid), "num_cases": len(curves),
                         "calibration_risk": float(fdr[:, g].mean()),
                         "mean_relative_volume": float(np.mean(masks[present] / reference[present]))
                         if present.any() else math.nan,
                         "guarantee": f"E[fraction of the mask outside the {name}] <= {alpha:g} (empty mask: 0)"}
    if "volume" in risks:
        scores = volume_scores(curves, index)
        k = int(np.sort(scores)[conformal_rank(len(curves), alpha) - 1])
        half = grid // 2
        voxel_ml = np.array([c.voxel_ml for c in curves])
        widths = np.array([c.mask_voxels()[index, half - k] - c.mask_voxels()[index, half + k] for c in curves]) * voxel_ml
        relative = widths[present] / (reference[present] * voxel_ml[present])
        result["volume"] = {"grid_steps": k, "low_volume_grid_index": half + k, "high_volume_grid_index": half - k,
                            "low_volume_threshold": threshold_of(half + k, grid), "high_volume_threshold": threshold_of(half - k, grid),
                            "num_cases": len(curves), "mean_width_ml": float(widths.mean()),
                            "mean_relative_width": float(relative.mean()) if present.any() else math.nan,
                            "guarantee": f"P(true {name} volume in [V(p >= low_volume_threshold), V(p >= high_volume_threshold)])"
                                         f" >= {1 - alpha:g}"}
    return result


def fit_rules(curves: Sequence[CaseCurves], label_names: Mapping[int, str], risks: Sequence[str], alpha: float,
              acceptance: AcceptanceFit | None = None, acceptance_settings: Mapping | None = None,
              source: Mapping | None = None) -> dict:
    """Fit the masks, intervals and acceptance rule on calibration cases into the ``conformal.json`` record.

    Args:
        curves: each calibration case's :class:`CaseCurves` (same labels and grid).
        label_names: label value -> name of the labels to calibrate (a subset of the curves' labels).
        risks: any of :data:`RISKS`.
        alpha: α in (0, 1): the risk level (FNR, FDR) and miscoverage (volume).
        acceptance: the fitted acceptance rule, if any.
        acceptance_settings: the score, its direction, the failure Dice, for the record.
        source: where the cases came from (folders, folds, temperature), for the record.

    Returns:
        The record, as ``conformal.json`` holds it (applied by :func:`masks_of` and :func:`volume_intervals`).
    """
    alpha = check_alpha(alpha)
    unknown = [r for r in risks if r not in RISKS]
    if unknown or not risks:
        raise ConformalError(f"--risk {' '.join(risks) or '(none)'}: choose from {', '.join(RISKS)}")
    if not curves:
        raise ConformalError("no calibration cases")
    if len({c.grid for c in curves}) != 1 or len({c.labels for c in curves}) != 1:
        raise ConformalError("the calibration cases' curves differ in grid or labels; compute them in one run")
    labels = curves[0].labels
    missing = [v for v in label_names if v not in labels]
    if missing:
        raise ConformalError(f"labels {missing} are not among the curves' labels {list(labels)}")
    record = {
        "version": CONFORMAL_VERSION, "alpha": alpha, "risks": list(risks), "num_cases": len(curves),
        "grid": curves[0].grid, "assumption": ASSUMPTION, "source": dict(source or {}),
        "labels": {name: _fit_label(curves, labels.index(value), name, risks, alpha)
                   for value, name in label_names.items()},
    }
    if acceptance is not None:
        record["acceptance"] = acceptance_record(acceptance, acceptance_settings or {})
    return record


def acceptance_record(fit: AcceptanceFit, settings: Mapping) -> dict:
    """The acceptance rule as stored in ``conformal.json``."""
    d = settings.get("failure_dice")
    text = (f"with probability >= {1 - fit.delta:g} over the {fit.num_cases} calibration cases, the fraction of accepted "
            f"cases with mean foreground Dice < {d:g} is <= {fit.max_failure_rate:g}")
    return {**dict(settings), "threshold": fit.threshold, "max_failure_rate": fit.max_failure_rate, "delta": fit.delta,
            "num_cases": fit.num_cases, "num_accepted": fit.num_accepted, "num_failed_accepted": fit.num_failed_accepted,
            "p_value": fit.p_value, "grid": list(fit.grid), "method": "Learn-then-Test, binomial p-values, Bonferroni",
            "guarantee": text if fit.threshold is not None else
            f"none: no threshold of the grid is certified at r = {fit.max_failure_rate:g}, delta = {fit.delta:g} with "
            f"{fit.num_cases} cases; every case is flagged"}


def check_record(record: Mapping, num_classes: int | None = None, where: str = "--conformal-json") -> None:
    """Raise :class:`ConformalError` unless ``record`` is a conformal.json this version reads."""
    if not isinstance(record, Mapping) or record.get("version") != CONFORMAL_VERSION or "labels" not in record:
        raise ConformalError(f"{where} is not a conformal.json of this nnunet-mbls (version {CONFORMAL_VERSION}); "
                             f"write it with nnunet-mbls conformal")
    if num_classes is not None:
        bad = [n for n, v in record["labels"].items() if not 0 < int(v["label"]) < num_classes]
        if bad:
            raise ConformalError(f"{where}: labels {bad} do not exist in this model's {num_classes} classes; pass the "
                                 f"conformal.json of this model")


def masks_of(record: Mapping, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """The conformal masks of a case: ``"<risk tag>_<label name>"`` -> (*spatial) bool, from (C, *spatial)
    probabilities on the image grid."""
    grid, alpha = int(record["grid"]), float(record["alpha"])
    masks = {}
    for name, fit in record["labels"].items():
        for risk in ("fnr", "fdr"):
            if risk in fit:
                masks[f"{risk_tag(risk, alpha)}_{name}"] = mask_at(probabilities[int(fit["label"])],
                                                                   int(fit[risk]["grid_index"]), grid)
    return masks


def volume_intervals(record: Mapping, probabilities: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """``volume_ml_<name>_low`` / ``_high`` of every label with a volume interval, for a case's probabilities."""
    grid = int(record["grid"])
    out = {}
    for name, fit in record["labels"].items():
        if "volume" in fit:
            p = probabilities[int(fit["label"])]
            out[f"volume_ml_{name}_low"] = int(mask_at(p, int(fit["volume"]["low_volume_grid_index"]), grid).sum()) * voxel_ml
            out[f"volume_ml_{name}_high"] = int(mask_at(p, int(fit["volume"]["high_volume_grid_index"]), grid).sum()) * voxel_ml
    return out
