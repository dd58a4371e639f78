"""The metrics of a case after temperature scaling, from its statistics (:mod:`~nnunet_mbls.calibration.case_statistics`).

Exact when the case's metric sample holds every voxel of the region (a region of at most ``metric_capacity``
voxels). Otherwise a stratified difference estimator: every state of a
:class:`~nnunet_mbls.calibration.metrics.CalibrationAccumulator` is a sum over voxels, so

    states(T) = states(1) + sum over voxels of (contribution at T - contribution at 1)

with states(1) known exactly and the second sum estimated from the stratified sample, each sampled voxel weighted
by its stratum's size / its stratum's sample size (a Horvitz-Thompson estimate, unbiased for every state). A voxel
whose contribution barely changes with T (saturated confidence) adds almost nothing to the estimate's variance,
and the strata refine the top-label bins, so the estimated top-label counts are never negative; fine and class
counts are clipped at 0. The error is measured by ``benchmarks/bench_calibration_step.py --estimator`` and
recorded with the method in calibration.json (:data:`ESTIMATOR`).
"""

from __future__ import annotations

import numpy as np
import torch

from nnunet_mbls.calibration.case_statistics import CaseStatistics
from nnunet_mbls.calibration.metrics import CalibrationAccumulator

#: how the metrics after T are obtained, as calibration.json records it
ESTIMATOR = (
    "exact for a case whose metric region has at most metric_capacity voxels (all kept); otherwise "
    "states(T) = exact states(1) + Horvitz-Thompson estimate of the change, from a stratified sample of the region "
    "(strata: correct or not x top-label bin, the last bin split by half-octaves of 1 - confidence)"
)
_COUNT_STATES = ("top_count", "cls_count", "fine_count")


def is_exact(statistics: CaseStatistics) -> bool:
    """Whether the case's metric sample holds every voxel of its region (the metrics after T are then exact)."""
    kept = np.bincount(statistics.sample_stratum.astype(np.int64), minlength=statistics.strata_sizes.size)
    return bool((kept == statistics.strata_sizes).all())


def _accumulate(statistics: CaseStatistics, rows: np.ndarray | slice, temperature: float) -> CalibrationAccumulator:
    accumulator = CalibrationAccumulator(statistics.settings.num_classes, statistics.settings.n_bins)
    log_probs = torch.from_numpy(np.ascontiguousarray(statistics.sample_log_probs[rows])).T
    if log_probs.shape[1]:
        target = torch.from_numpy(statistics.sample_target[rows].astype(np.int64))
        accumulator.update(torch.softmax(log_probs / temperature, dim=0), target)
    return accumulator


def accumulator_after(statistics: CaseStatistics, temperature: float) -> CalibrationAccumulator:
    """The case's metric-region accumulator after ``normalize(p ** (1/T))``: exact or estimated (module docstring).

    Args:
        statistics: the case's statistics.
        temperature: T > 0.

    Returns:
        A :class:`CalibrationAccumulator` over the case's metric region.
    """
    if is_exact(statistics):
        return _accumulate(statistics, slice(None), temperature)
    kept = np.bincount(statistics.sample_stratum.astype(np.int64), minlength=statistics.strata_sizes.size)
    weight_of_stratum = np.where(kept > 0, statistics.strata_sizes / np.maximum(kept, 1), 0.0)
    weights = weight_of_stratum[statistics.sample_stratum.astype(np.int64)]
    states = [s.clone() for s in statistics.accumulator().state_tensors()]
    for weight in np.unique(weights):
        rows = np.flatnonzero(weights == weight)
        at_t = _accumulate(statistics, rows, temperature).state_tensors()
        at_1 = _accumulate(statistics, rows, 1.0).state_tensors()
        for state, after, before in zip(states, at_t, at_1):
            state += float(weight) * (after - before)
    names = CalibrationAccumulator.STATE_NAMES
    for name in _COUNT_STATES:
        states[names.index(name)].clamp_(min=0)
    result = CalibrationAccumulator(statistics.settings.num_classes, statistics.settings.n_bins)
    result.load_state_tensors(states)
    return result
