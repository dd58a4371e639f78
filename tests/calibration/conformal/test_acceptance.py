"""The acceptance rule: its guarantee checked against a population whose failure rate is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_mbls.calibration.conformal.acceptance import accepted, fewest_cases, fit_acceptance, score_grid
from nnunet_mbls.calibration.conformal.risk import ConformalError


def test_fewest_cases_and_grids():
    assert fewest_cases(0.1, 0.1, 20) == 51  # 0.9^51 = 0.0046 <= 0.1/20 < 0.9^50
    assert score_grid(True, 2.0, 4).tolist() == [0.125, 0.5, 1.125, 2.0]
    assert score_grid(False, 1.0, 4).tolist() == [0.9375, 0.75, 0.4375, 0.0]
    assert accepted(np.array([0.1, np.nan, 0.5]), 0.3, True).tolist() == [True, False, False]
    assert accepted(np.array([0.9, np.nan, 0.5]), 0.8, False).tolist() == [True, False, False]


def test_a_single_threshold_matches_the_binomial_hand_computation():
    # 100 cases, score i/100; failures at scores >= 0.9 and one at 0.05. Grid {0.5}: 51 accepted (<= 0.5), 1 failed.
    scores = np.arange(100) / 100
    failed = (scores >= 0.9) | (scores == 0.05)
    fit = fit_acceptance(scores, failed, True, 0.1, 0.1, np.array([0.5]))
    # P(Bin(51, 0.1) <= 1) = 0.9^51 + 51 * 0.1 * 0.9^50
    assert fit.p_value == pytest.approx(0.9 ** 51 + 51 * 0.1 * 0.9 ** 50)
    assert fit.threshold == 0.5 and (fit.num_accepted, fit.num_failed_accepted) == (51, 1)
    assert fit_acceptance(scores, failed, True, 0.01, 0.1, np.array([0.5])).threshold is None
    with pytest.raises(ConformalError, match="--max-failure-rate 1.2 must lie strictly between 0 and 1"):
        fit_acceptance(scores, failed, True, 1.2, 0.1, np.array([0.5]))


def test_guarantee_holds_over_repeated_calibration_sets():
    """Scores ~ U(0, 1), P(fail | s) = s^2: the failure rate among cases with s <= t is t^2/3, known exactly.
    The rule's true failure rate exceeds r in at most a fraction delta of calibration sets, and it accepts a
    useful share of cases (the best threshold with rate <= r is sqrt(3r) = 0.548; with 400 cases, a 90% guarantee and
    20 thresholds the binomial test certifies about half of it)."""
    r, delta, grid = 0.1, 0.1, score_grid(True, 1.0)
    rng = np.random.default_rng(0)
    violations, thresholds = 0, []
    for _ in range(300):
        s = rng.uniform(size=400)
        failed = rng.uniform(size=400) < s ** 2
        fit = fit_acceptance(s, failed, True, r, delta, grid)
        tau = fit.threshold or 0.0
        thresholds.append(tau)
        violations += tau > 0 and tau ** 2 / 3 > r
    assert violations / 300 <= delta
    assert np.mean(thresholds) > 0.2
