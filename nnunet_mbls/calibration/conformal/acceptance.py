"""A case-acceptance threshold with a finite-sample guarantee on the failure rate among accepted cases.

Accept a case when its QC score is on the good side of τ (at most τ for an entropy, at least τ for a Dice). For
each τ of a grid fixed before the data are seen, the hypothesis H_τ: "the failure rate among accepted cases is
above r" is tested on n labelled cases with the exact binomial p-value P(Binomial(m_τ, r) ≤ k_τ) (m_τ cases
accepted, k_τ of them failed; given m_τ, the accepted cases are i.i.d. draws of accepted cases, so the p-value is
valid). Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei, 2021) with a Bonferroni correction over the K
grid points rejects H_τ when its p-value is ≤ δ/K; every rejected τ then has a failure rate among accepted cases
≤ r, all at once, with probability ≥ 1 − δ over the calibration cases. The loosest rejected τ (most cases
accepted) is chosen. When none is rejected, no threshold is certified and every case is to be flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .risk import ConformalError, check_alpha

#: thresholds in the grid of an acceptance rule
ACCEPTANCE_GRID = 20


def score_grid(higher_is_worse: bool, upper: float, size: int = ACCEPTANCE_GRID) -> np.ndarray:
    """A data-independent grid of thresholds, strict to loose, denser near the good end of the score's range.

    Args:
        higher_is_worse: True for entropies (range [0, ``upper``]), False for Dice (range [0, 1]).
        upper: the largest value of the score (ln C for an entropy over C classes, 1 for a Dice).
        size: K, the number of thresholds.

    Returns:
        (K,) thresholds: upper·(k/K)² for entropies, 1 − (k/K)² for Dice, k = 1..K.
    """
    k = np.arange(1, size + 1) / size
    return upper * k ** 2 if higher_is_worse else upper * (1.0 - k ** 2)


def accepted(scores: np.ndarray, threshold: float, higher_is_worse: bool) -> np.ndarray:
    """Which cases a threshold accepts (a NaN score is never accepted)."""
    scores = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return scores <= threshold if higher_is_worse else scores >= threshold


@dataclass(frozen=True)
class AcceptanceFit:
    """The fitted rule: ``threshold`` (None: nothing certified) and what was tested."""

    threshold: float | None
    max_failure_rate: float
    delta: float
    num_cases: int
    num_accepted: int
    num_failed_accepted: int
    p_value: float | None
    grid: tuple[float, ...]


def fit_acceptance(scores: np.ndarray, failed: np.ndarray, higher_is_worse: bool, max_failure_rate: float,
                   delta: float, grid: np.ndarray) -> AcceptanceFit:
    """Learn-then-Test with Bonferroni over ``grid`` (module docstring).

    Args:
        scores: (n,) QC score of each calibration case (NaN: never accepted).
        failed: (n,) whether each case failed (e.g. Dice below d).
        higher_is_worse: the score's direction.
        max_failure_rate: r in (0, 1), the failure rate allowed among accepted cases.
        delta: δ in (0, 1), the probability that the guarantee fails.
        grid: the candidate thresholds, fixed before seeing the data.

    Returns:
        The :class:`AcceptanceFit` (``threshold`` None when no grid point is certified).
    """
    from scipy.stats import binom

    r = check_alpha(max_failure_rate, "--max-failure-rate")
    delta = check_alpha(delta, "--delta")
    scores, failed = np.asarray(scores, dtype=np.float64), np.asarray(failed, dtype=bool)
    if scores.shape != failed.shape or scores.ndim != 1:
        raise ConformalError(f"scores {scores.shape} and failures {failed.shape} must be two (n,) arrays")
    grid = np.asarray(grid, dtype=np.float64)
    best: tuple | None = None
    for tau in grid:
        chosen = accepted(scores, tau, higher_is_worse)
        m, k = int(chosen.sum()), int((chosen & failed).sum())
        p_value = float(binom.cdf(k, m, r)) if m else 1.0
        if p_value <= delta / grid.size and (best is None or m > best[1]):
            best = (float(tau), m, k, p_value)
    if best is None:
        return AcceptanceFit(None, r, delta, int(scores.size), 0, 0, None, tuple(map(float, grid)))
    return AcceptanceFit(best[0], r, delta, int(scores.size), best[1], best[2], best[3], tuple(map(float, grid)))


def fewest_cases(max_failure_rate: float, delta: float, grid_size: int = ACCEPTANCE_GRID) -> int:
    """Accepted cases needed, all good, to certify r at δ: the smallest m with (1 − r)^m ≤ δ/K."""
    return math.ceil(math.log(delta / grid_size) / math.log(1.0 - max_failure_rate))
