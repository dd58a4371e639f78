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

from nnunet_mbls.calibration.case_statistics import CaseStatistics, RegionSample
from nnunet_mbls.calibration.metrics import CalibrationAccumulator

#: how the values after T are obtained, as calibration.json records it
ESTIMATOR = (
    "exact for a case whose region has at most the sample's capacity of voxels (all kept); otherwise "
    "value(T) = exact value(1) + Horvitz-Thompson estimate of the change, from a stratified sample of the region "
    "(strata: correct or not x top-label bin, the last bin split by half-octaves of 1 - confidence)"
)
#: the estimator's error as measured (recorded in calibration.json with the method)
MEASURED_ERROR = (
    "docs/BENCHMARKS.md 3.7 (benchmarks/bench_calibration_step.py --estimator, one generated case per size, T = 0.7, "
    "1.3, 2.0): |ECE error| <= 1.7e-4 with 16 classes and 872 k foreground voxels (19 k sampled), <= 6.4e-4 with 117 "
    "classes and 649 k (2.8 k sampled); classwise ECE <= 1.3e-3, NLL <= 2.4e-3, Brier <= 8.7e-4, adaptive ECE "
    "<= 2.6e-3; MCE (a maximum over sparse bins) is not reliable after T when estimated (error up to 0.47)"
)
_COUNT_STATES = ("top_count", "cls_count", "fine_count")


def is_exact(region: CaseStatistics | RegionSample) -> bool:
    """Whether a region's sample holds every voxel of it (its values after T are then exact); a
    :class:`CaseStatistics` stands for its metric region."""
    region = region.metric if isinstance(region, CaseStatistics) else region
    kept = np.bincount(region.stratum.astype(np.int64), minlength=region.strata_sizes.size)
    return bool((kept == region.strata_sizes).all())


def _weight_groups(region: RegionSample):
    """(weight, rows) of the sample: stratum size / stratum sample size, rows sharing it (1 for whole strata)."""
    stratum = region.stratum.astype(np.int64)
    kept = np.bincount(stratum, minlength=region.strata_sizes.size)
    weights = np.where(kept > 0, region.strata_sizes / np.maximum(kept, 1), 0.0)[stratum]
    return [(float(w), np.flatnonzero(weights == w)) for w in np.unique(weights)]


def _tempered(region: RegionSample, rows, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.from_numpy(np.ascontiguousarray(region.log_probs[rows])).T
    return torch.softmax(log_probs / temperature, dim=0), torch.from_numpy(region.target[rows].astype(np.int64))


def _accumulate(statistics: CaseStatistics, region: RegionSample, rows, temperature: float) -> CalibrationAccumulator:
    accumulator = CalibrationAccumulator(statistics.settings.num_classes, statistics.settings.n_bins)
    if len(region.target[rows]):
        accumulator.update(*_tempered(region, rows, temperature))
    return accumulator


def accumulator_after(statistics: CaseStatistics, temperature: float,
                      region: RegionSample | None = None) -> CalibrationAccumulator:
    """A region's accumulator after ``normalize(p ** (1/T))``: exact or estimated (module docstring).

    Args:
        statistics: the case's statistics.
        temperature: T > 0.
        region: one of its regions with accumulator states (default: the metric region).

    Returns:
        A :class:`CalibrationAccumulator` over the region.
    """
    region = region or statistics.metric
    if is_exact(region):
        return _accumulate(statistics, region, slice(None), temperature)
    states = [s.clone() for s in statistics.accumulator(region).state_tensors()]
    for weight, rows in _weight_groups(region):
        at_t = _accumulate(statistics, region, rows, temperature).state_tensors()
        at_1 = _accumulate(statistics, region, rows, 1.0).state_tensors()
        for state, after, before in zip(states, at_t, at_1):
            state += weight * (after - before)
    names = CalibrationAccumulator.STATE_NAMES
    for name in _COUNT_STATES:
        states[names.index(name)].clamp_(min=0)
    result = CalibrationAccumulator(statistics.settings.num_classes, statistics.settings.n_bins)
    result.load_state_tensors(states)
    return result


def _entropy(probs: torch.Tensor) -> float:
    return -float(torch.special.xlogy(probs, probs).sum(dtype=torch.float64))


def mean_entropy_after(region: RegionSample, temperature: float) -> float:
    """A region's mean predictive entropy (nats) after ``normalize(p ** (1/T))`` (NaN for an empty region): exact
    or estimated as the metrics are."""
    if region.entropy_sum is None:
        raise ValueError("this region's entropy was not kept (see nnunet_mbls.calibration.case_statistics.QC_REGIONS)")
    if region.n_voxels == 0:
        return float("nan")
    if is_exact(region):
        return _entropy(_tempered(region, slice(None), temperature)[0]) / region.n_voxels
    total = region.entropy_sum
    for weight, rows in _weight_groups(region):
        total += weight * (_entropy(_tempered(region, rows, temperature)[0]) - _entropy(_tempered(region, rows, 1.0)[0]))
    return max(total, 0.0) / region.n_voxels
