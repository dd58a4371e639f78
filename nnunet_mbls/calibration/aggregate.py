"""Per-case calibration metrics aggregated over cases: the paper's "per case, then mean over cases"."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: the metrics a :class:`~nnunet_mbls.calibration.metrics.CalibrationAccumulator` computes per case
METRIC_KEYS = ("ece", "cece", "nll", "brier", "mce", "ece_adaptive")


def aggregate(per_case: Sequence[dict], keys: Sequence[str] = METRIC_KEYS) -> dict[str, float | int]:
    """Mean over cases of per-case metric dicts ("per case then mean over cases", the paper's mode).

    Contrast with "pooled": one accumulator over all voxels of all cases.

    Args:
        per_case: one dict per case, e.g. :meth:`CalibrationAccumulator.compute` outputs; a missing key
            counts as NaN.
        keys: the metrics to aggregate (default :data:`METRIC_KEYS`).

    Returns:
        For each key: ``key`` = mean over cases ignoring NaN (a case with no voxel in the region; NaN when
        no case has a value), ``key_std`` = sample standard deviation (ddof=1; NaN with fewer than 2 values),
        ``key_n`` = number of non-NaN cases. Also ``n_cases`` and ``n_voxels`` (total, when the dicts carry it).

    Raises:
        ValueError: ``per_case`` is empty.
    """
    if len(per_case) == 0:
        raise ValueError("per_case is empty: no case to aggregate; check that the prediction folder has files")
    out: dict[str, float | int] = {}
    for k in keys:
        values = np.array([float(d.get(k, math.nan)) for d in per_case], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[k] = float(finite.mean()) if finite.size else math.nan
        out[f"{k}_std"] = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
        out[f"{k}_n"] = int(finite.size)
    out["n_cases"] = len(per_case)
    out["n_voxels"] = int(sum(int(d.get("n_voxels", 0)) for d in per_case))
    return out
