"""``benchmark --conformal``: how tight the conformal guarantees are per trainer and stage, the practical measure
of what calibration buys.

For each trainer, the out-of-fold validation cases of its finished folds are predicted again (nnU-Net's
validation, the per-case curves streamed out of its export: :func:`~nnunet_mbls.conformal.trained.out_of_fold_curves`)
as trained and after the temperature (shared by the folds when there are several, else the fold's own); on those
cases the rules of ``nnunet-mbls conformal`` are fitted at α and measured: the mean volume of the FNR and FDR masks
relative to the reference, the mean width of the volume interval relative to the reference volume, and the
fraction of cases the acceptance rule accepts (failure: Dice below the failure-detection τ). Smaller masks and
intervals at the same guarantee mean more useful probabilities. Intervals: percentile bootstrap over cases (the
rules refitted on each resample).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..calibration.conformal.acceptance import fit_acceptance, score_grid
from ..calibration.conformal.curves import CaseCurves
from ..calibration.conformal.risk import ConformalError
from ..calibration.conformal.rules import fit_rules
from ..conformal.record import case_failed
from .grid import Cell

#: the measured quantities: name -> (description, key path in a label's fit)
MEASURES = {"fnr_volume": ("FNR-mask volume / reference", ("fnr", "mean_relative_volume")),
            "fdr_volume": ("FDR-mask volume / reference", ("fdr", "mean_relative_volume")),
            "interval_width": ("volume-interval width / reference volume", ("volume", "mean_relative_width"))}
BOOTSTRAP = 200


def tightness(curves: Sequence[CaseCurves], alpha: float, failure_dice: float, num_classes: int,
              max_failure_rate: float = 0.1, delta: float = 0.1) -> dict:
    """The measures of one trainer and stage: per label, each of :data:`MEASURES` (mean over labels too), and the
    accepted fraction of the acceptance rule on ``mean_entropy_fg``."""
    labels = {value: str(value) for value in curves[0].labels}
    grid = score_grid(True, math.log(num_classes))
    scores = np.array([c.scores.get("mean_entropy_fg", math.nan) for c in curves])
    failed = np.array([case_failed(c, failure_dice) for c in curves])

    def measure(index: np.ndarray) -> dict[str, float]:
        chosen = [curves[i] for i in index]
        record = fit_rules(chosen, labels, ["fnr", "fdr", "volume"], alpha)
        out = {}
        for name, (_, (risk, key)) in MEASURES.items():
            values = [fit[risk][key] for fit in record["labels"].values() if risk in fit]
            out[name] = float(np.nanmean(values)) if values else math.nan
        accept = fit_acceptance(scores[index], failed[index], True, max_failure_rate, delta, grid)
        out["accepted_fraction"] = accept.num_accepted / len(index)
        return out

    try:
        value = measure(np.arange(len(curves)))
    except ConformalError as error:
        return {"n_cases": len(curves), "note": str(error)}
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(BOOTSTRAP):
        try:
            samples.append(measure(rng.integers(0, len(curves), len(curves))))
        except ConformalError:  # a resample without the structure: left out (counted)
            continue
    out = {"n_cases": len(curves), "n_failures": int(failed.sum()), "alpha": alpha, "failure_dice": failure_dice,
           "n_boot_used": len(samples)}
    for name, v in value.items():
        column = np.array([s[name] for s in samples], dtype=np.float64)
        column = column[~np.isnan(column)]
        low, high = (np.percentile(column, [2.5, 97.5]).tolist() if column.size else (math.nan, math.nan))
        out[name] = {"value": v, "low": float(low), "high": float(high)}
    return out


def conformal_of_trainer(done: Sequence[Cell], shared_temperature: float | None, alpha: float, failure_dice: float,
                         device: str) -> dict:
    """Stage (``before``, ``after`` or ``shared``) -> :func:`tightness` of one trainer's finished folds."""
    import json

    from ..conformal.trained import fold_temperature, out_of_fold_curves
    from ..layout import FoldFolder

    first = done[0]
    folders = [FoldFolder.of(c.dataset, c.configuration, c.fold, c.trainer, c.plans) for c in done]
    dataset_json = json.loads((folders[0].path.parent / "dataset.json").read_text())
    num_classes = len([k for k in dataset_json["labels"] if k != "ignore"])
    ignore = dataset_json["labels"].get("ignore")
    calibrated = ("shared", [(shared_temperature, "shared")] * len(folders)) if shared_temperature is not None else \
        ("after", [fold_temperature(f, False) for f in folders])
    out = {}
    for stage, temperatures in (("before", [(1.0, "as trained")] * len(folders)), calibrated):
        curves = out_of_fold_curves(first.dataset, first.configuration, first.trainer, first.plans, folders,
                                    temperatures, num_classes, ignore, device)
        out[stage] = tightness(curves, alpha, failure_dice, num_classes)
    return out
