"""Conformal risk control on a grid: λ̂ against hand computations, the guarantee against repeated splits."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.conformal import overconfident_curves
from nnunet_mbls.calibration.conformal.risk import (ConformalError, check_alpha, conformal_quantile, conformal_rank,
                                                    crc_index, min_cases, monotone_upper)


def test_crc_index_equals_the_hand_computation():
    # losses of 2 cases at lambda_0..lambda_4; n/(n+1) R + 1/(n+1) <= alpha  <=>  mean <= (alpha - 1/3) * 3/2
    losses = np.array([[1.0, 0.5, 0.25, 0.0, 0.0],
                       [1.0, 0.5, 0.5, 0.5, 0.0]])  # means 1, .5, .375, .25, 0
    assert crc_index(losses, 0.5) == 3        # mean <= 0.25
    assert crc_index(losses, 0.6) == 2        # mean <= 0.4
    assert crc_index(losses, 0.4) == 4        # mean <= 0.1


def test_too_few_cases_and_bad_alpha_name_the_fix():
    assert min_cases(0.1) == 9 and min_cases(0.5) == 1 and min_cases(0.3) == 3
    with pytest.raises(ConformalError, match=r"at least 9 calibration cases.*got 5.*raise --alpha to at least 0\.167"):
        crc_index(np.zeros((5, 3)), 0.1)
    for bad in (0, 1, 1.5, -0.1, "x", float("nan")):
        with pytest.raises(ConformalError, match=r"--alpha .* strictly between 0 and 1"):
            check_alpha(bad)
    with pytest.raises(ConformalError, match="non-increasing"):
        crc_index(np.array([[0.0, 0.5, 0.0]] * 3), 0.5)
    with pytest.raises(ConformalError, match="coverage 0.9 needs at least 9"):
        conformal_rank(5, 0.1)


def test_monotone_upper_is_the_running_maximum_from_the_conservative_end():
    losses = np.array([[0.2, 0.5, 0.1, 0.3, 0.0]])
    assert monotone_upper(losses).tolist() == [[0.5, 0.5, 0.3, 0.3, 0.0]]


def test_conformal_quantile_is_the_ceil_rank():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0,
                       18.0, 19.0])  # n = 19, alpha 0.1: rank ceil(20 * 0.9) = 18
    assert conformal_quantile(scores, 0.1) == 18.0


def test_fnr_guarantee_holds_and_is_tight_on_repeated_splits():
    """Over-confident model (argmax FNR ~0.3): CRC's threshold keeps the mean test FNR at alpha, not far below."""
    curves = overconfident_curves(300, seed=1)
    fnr = np.stack([c.false_negative_rate()[0] for c in curves])  # (n, G+1) along thresholds
    grid = curves[0].grid
    assert fnr[:, grid // 2].mean() > 0.2  # the 0.5 threshold misses far more than alpha
    rng = np.random.default_rng(0)
    alpha, test_risks = 0.1, []
    for _ in range(200):
        order = rng.permutation(len(curves))
        calibration, test = order[:100], order[100:]
        g = grid - crc_index(fnr[calibration, ::-1], alpha)
        test_risks.append(fnr[test, g].mean())
    mean = float(np.mean(test_risks))
    assert alpha - 0.03 <= mean <= alpha + 0.005, mean
