"""Percentile bootstrap intervals over cases for the benchmark's statistics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class BootstrapInterval(NamedTuple):
    """A percentile bootstrap interval; unpacks as ``low, high, n_used``."""

    low: float
    high: float
    #: resamples whose statistic was defined (not NaN); the interval uses only these
    n_used: int


def bootstrap_ci(stat_fn: Callable[..., float], *arrays, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> BootstrapInterval:
    """Percentile bootstrap interval of ``stat_fn(*arrays)`` over cases.

    Each of the ``n_boot`` resamples draws n case indices uniformly with replacement
    (``numpy.random.default_rng(seed).integers(0, n, size=(n_boot, n))``) and applies the **same
    indices to every array**. Resamples where the statistic is NaN (undefined, e.g. AUROC with one
    class) are dropped. The same ``seed`` and n give the same resamples, so intervals of
    different statistics or scores on the same cases are computed on identical resamples.

    Args:
        stat_fn: the statistic, called as ``stat_fn(*resampled_arrays)`` and returning a float.
        *arrays: one or more per-case arrays of equal length n along axis 0 (the same case order).
        n_boot: number of resamples, a positive integer (default 1000).
        seed: seed of the resampling (default 0).
        level: interval level, strictly between 0 and 1 (default 0.95).

    Returns:
        :class:`BootstrapInterval`: ``low`` and ``high`` are the ``(1 - level)/2`` and ``(1 + level)/2``
        quantiles (numpy percentile, linear) of the remaining ``n_used`` values; ``(nan, nan, 0)``
        when no resample is defined.

    Raises:
        ValueError: ``stat_fn`` is not callable; no array, a scalar array, arrays of different lengths or
            empty arrays; ``n_boot`` is not a positive integer; ``level`` is not strictly between 0 and 1.
    """
    if not callable(stat_fn):
        raise ValueError(f"`stat_fn` must be callable (arrays -> float); got {type(stat_fn).__name__}")
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one per-case array after `stat_fn`; pass e.g. (aurc, risk, score)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"`n_boot` must be a positive integer; got {n_boot!r}; 1000 is the usual choice")
    if not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
        raise ValueError(f"`level` must lie strictly between 0 and 1; got {level!r}; e.g. 0.95 for a 95% interval")
    data = [np.asarray(a) for a in arrays]
    for i, a in enumerate(data):
        if a.ndim == 0:
            raise ValueError(f"`arrays[{i}]` is a scalar; pass per-case arrays (cases along axis 0)")
    n = data[0].shape[0]
    for i, a in enumerate(data[1:], start=1):
        if a.shape[0] != n:
            raise ValueError(f"`arrays[{i}]` has {a.shape[0]} cases but `arrays[0]` has {n}; "
                             "pass one value per case, in the same case order, in every array")
    if n == 0:
        raise ValueError("the arrays are empty; the bootstrap needs at least one case")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(int(n_boot), n))
    stats = np.array([float(stat_fn(*(a[idx] for a in data))) for idx in indices])
    defined = stats[~np.isnan(stats)]
    if defined.size == 0:
        return BootstrapInterval(math.nan, math.nan, 0)
    alpha = (1.0 - float(level)) / 2.0
    low, high = np.percentile(defined, [100.0 * alpha, 100.0 * (1.0 - alpha)], method="linear")
    return BootstrapInterval(float(low), float(high), int(defined.size))


# ----------------------------------------------------------------------------------------------
# summary
