"""nnunet_mbls.benchmark.failure: risk-coverage, AURC, E-AURC, failure AUROC and bootstrap against naive references.

The references here are computed differently from the module: explicit Python loops over coverage
levels, brute-force enumeration of every ordering of tied cases, pairwise Mann-Whitney counts,
scikit-learn called directly, and hand-derived numbers.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nnunet_mbls.benchmark.failure import (
    as_uncertainty,
    aurc,
    auroc_failure,
    auroc_undefined_reason,
    bootstrap_ci,
    default_tau,
    e_aurc,
    failure_labels,
    optimal_aurc,
    risk_coverage,
    summarise_failure_detection,
)

from helpers.failure import synthetic_cases


# ---------------------------------------------------------------------------------------------
# naive references


def naive_curve_of_order(risks_in_order: list[float]) -> list[float]:
    """Selective risk at k = 1..n for cases accepted in the given order, by explicit loops."""
    curve = []
    for k in range(1, len(risks_in_order) + 1):
        total = 0.0
        for j in range(k):
            total += risks_in_order[j]
        curve.append(total / k)
    return curve


def naive_aurc_of_order(risks_in_order: list[float]) -> float:
    curve = naive_curve_of_order(risks_in_order)
    return sum(curve) / len(curve)


def naive_expected_curve(risk: list[float], score: list[float]) -> list[float]:
    """Average of the naive curve over every ordering consistent with ascending score
    (all permutations inside each tie group enumerated)."""
    values = sorted(set(score))
    groups = [[i for i in range(len(score)) if score[i] == v] for v in values]
    curves = []
    for choice in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = [i for group in choice for i in group]
        curves.append(naive_curve_of_order([risk[i] for i in order]))
    return [sum(c[k] for c in curves) / len(curves) for k in range(len(risk))]


def naive_pairwise_auroc(failed: list[bool], score: list[float]) -> float:
    """P(score of a failed case > score of a successful case), ties counted 1/2."""
    wins, pairs = 0.0, 0
    for i in range(len(score)):
        for j in range(len(score)):
            if failed[i] and not failed[j]:
                pairs += 1
                if score[i] > score[j]:
                    wins += 1.0
                elif score[i] == score[j]:
                    wins += 0.5
    return wins / pairs


# ---------------------------------------------------------------------------------------------
# risk-coverage and AURC without ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_risk_coverage_and_aurc_match_explicit_loops(seed):
    dice, score = synthetic_cases(40, seed)
    risk = 1 - dice
    assert len(set(score.tolist())) == score.size  # no ties here
    order = sorted(range(risk.size), key=lambda i: score[i])
    expected = naive_curve_of_order([risk[i] for i in order])
    coverage, selective = risk_coverage(risk, score)
    assert coverage.shape == selective.shape == (40,)
    np.testing.assert_allclose(coverage, [(k + 1) / 40 for k in range(40)], rtol=0, atol=1e-15)
    np.testing.assert_allclose(selective, expected, rtol=1e-12, atol=1e-14)
    assert aurc(risk, score) == pytest.approx(naive_aurc_of_order([risk[i] for i in order]), rel=1e-12)


def test_aurc_uses_ascending_score_as_most_confident_first():
    # risk 0, 1 ; score says case 0 is confident -> curve (0, 0.5), AURC 0.25; reversed -> (1, 0.5), 0.75
    assert aurc([0.0, 1.0], [0.1, 0.9]) == pytest.approx(0.25, abs=1e-15)
    assert aurc([0.0, 1.0], [0.9, 0.1]) == pytest.approx(0.75, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# ties


def test_constant_score_gives_mean_risk():
    # hand-derived: all cases tied -> every prefix position gets the mean risk (0 + 0.2 + 0.4 + 1.0) / 4 = 0.4,
    # so the selective risk is 0.4 at every coverage and the AURC is 0.4
    risk = [0.0, 0.2, 0.4, 1.0]
    coverage, selective = risk_coverage(risk, [3.0] * 4)
    np.testing.assert_allclose(selective, [0.4] * 4, rtol=1e-12)
    assert aurc(risk, [3.0] * 4) == pytest.approx(0.4, rel=1e-12)


def test_hand_made_tie_group():
    # cases A B C D, risks 0.1 0.5 0.3 0.9, scores 0 1 1 2: B and C are tied.
    # Order A, {B, C}, D; the tie group's mean risk is (0.5 + 0.3) / 2 = 0.4, so prefix contributions are
    # 0.1, 0.4, 0.4, 0.9:
    #   r1 = 0.1
    #   r2 = (0.1 + 0.4) / 2 = 0.25   (= mean of 0.3 [B first] and 0.2 [C first])
    #   r3 = (0.1 + 0.8) / 3 = 0.3
    #   r4 = (0.1 + 0.8 + 0.9) / 4 = 0.45
    # AURC = (0.1 + 0.25 + 0.3 + 0.45) / 4 = 0.275.
    # Optimal order 0.1, 0.3, 0.5, 0.9: r = 0.1, 0.2, 0.3, 0.45 -> AURC 1.05 / 4 = 0.2625, E-AURC = 0.0125.
    # (Breaking the tie by input order would give 0.2875, the other way 0.2625.)
    risk = [0.1, 0.5, 0.3, 0.9]
    score = [0.0, 1.0, 1.0, 2.0]
    _, selective = risk_coverage(risk, score)
    np.testing.assert_allclose(selective, [0.1, 0.25, 0.3, 0.45], rtol=1e-12)
    assert aurc(risk, score) == pytest.approx(0.275, rel=1e-12)
    assert optimal_aurc(risk) == pytest.approx(0.2625, rel=1e-12)
    assert e_aurc(risk, score) == pytest.approx(0.0125, rel=1e-9)
    # the result does not depend on the order the cases are given in
    for perm in itertools.permutations(range(4)):
        assert aurc([risk[i] for i in perm], [score[i] for i in perm]) == pytest.approx(0.275, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_ties_equal_brute_force_expectation_over_orderings(seed):
    rng = np.random.default_rng(100 + seed)
    n = 7
    risk = rng.uniform(0, 1, size=n).round(3).tolist()
    score = rng.integers(0, 3, size=n).astype(float).tolist()  # several tie groups
    expected = naive_expected_curve(risk, score)
    _, selective = risk_coverage(risk, score)
    np.testing.assert_allclose(selective, expected, rtol=1e-12, atol=1e-14)
    assert aurc(risk, score) == pytest.approx(sum(expected) / n, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# E-AURC


@pytest.mark.parametrize("seed", [0, 3])
def test_perfect_ranking_has_zero_e_aurc_exactly(seed):
    dice, _ = synthetic_cases(50, seed)
    risk = 1 - np.round(dice, 2)  # many equal risks
    assert len(set(risk.tolist())) < risk.size
    assert e_aurc(risk, risk) == 0.0
    assert e_aurc(risk, np.exp(3 * risk) + 1.0) == 0.0  # any increasing function of the risk
    assert optimal_aurc(risk) == pytest.approx(naive_aurc_of_order(sorted(risk.tolist())), rel=1e-12)


def test_perfect_ranking_is_exact_for_tie_groups_whose_float_mean_rounds():
    # (0.7 + 0.7 + 0.7) / 3 != 0.7 in floating point; a tie group of equal risks must keep 0.7 itself
    assert sum([0.7] * 3) / 3 != 0.7 and sum([0.35] * 3) / 3 != 0.35
    for risk in ([0.7, 0.1, 0.7, 0.7], [0.35, 0.05, 0.35, 0.95, 0.35]):
        assert e_aurc(risk, risk) == 0.0
        assert e_aurc(risk, [2 * r for r in risk]) == 0.0


@pytest.mark.parametrize("seed", [0, 4])
def test_reversed_ranking_gives_maximal_e_aurc(seed):
    dice, score = synthetic_cases(30, seed)
    risk = 1 - dice
    worst = naive_aurc_of_order(sorted(risk.tolist(), reverse=True)) - naive_aurc_of_order(sorted(risk.tolist()))
    assert e_aurc(risk, -risk) == pytest.approx(worst, rel=1e-12)
    assert worst > 0
    rng = np.random.default_rng(seed)
    others = [e_aurc(risk, rng.permutation(risk.size).astype(float)) for _ in range(200)] + [e_aurc(risk, score)]
    assert max(others) < e_aurc(risk, -risk)
    assert min(others) > 0


def test_informative_score_beats_random_and_constant():
    dice, score = synthetic_cases(200, 7, noise=0.05)
    risk = 1 - dice
    assert e_aurc(risk, score) < e_aurc(risk, np.zeros_like(risk)) / 3


# ---------------------------------------------------------------------------------------------
# failure AUROC and tau


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_and_pairwise_count(seed):
    dice, score = synthetic_cases(60, seed)
    dice, score = np.round(dice, 2), np.round(score, 1)  # ties in Dice and in the score
    tau = 0.75
    failed = (dice < tau).tolist()
    assert 0 < sum(failed) < len(failed)
    value = auroc_failure(dice, score, tau)
    assert value == pytest.approx(roc_auc_score(np.array(failed, dtype=int), score), abs=1e-12)
    assert value == pytest.approx(naive_pairwise_auroc(failed, score.tolist()), abs=1e-12)
    assert auroc_failure(dice, score, tau, return_reason=True) == (value, None)


@pytest.mark.parametrize("seed", [0, 5])
def test_rank_based_auroc_of_the_bootstrap_equals_sklearn(seed):
    from nnunet_mbls.benchmark.failure import _auroc_mann_whitney

    dice, score = synthetic_cases(50, seed)
    failed = np.round(dice, 1) < 0.8
    score = np.round(score, 1)  # ties
    assert _auroc_mann_whitney(failed, score) == pytest.approx(roc_auc_score(failed, score), abs=1e-12)
    assert math.isnan(_auroc_mann_whitney(np.zeros(5, bool), np.arange(5.0)))


def test_auroc_direction_and_as_uncertainty():
    dice = np.array([0.2, 0.5, 0.8, 0.9, 0.95])
    confidence = dice.copy()  # e.g. fold agreement: low = doubtful
    assert auroc_failure(dice, as_uncertainty(confidence, higher_is_doubtful=False), 0.6) == 1.0
    assert auroc_failure(dice, confidence, 0.6) == 0.0
    np.testing.assert_array_equal(as_uncertainty(confidence, higher_is_doubtful=True), confidence)
    with pytest.raises(ValueError, match="higher_is_doubtful"):
        as_uncertainty(confidence, higher_is_doubtful="no")


def test_failure_is_strictly_below_tau():
    np.testing.assert_array_equal(failure_labels([0.5, 0.7, 0.7000001], 0.7), [True, False, False])


@pytest.mark.parametrize("dice, word", [([0.8, 0.9, 0.95], "no failed case"), ([0.1, 0.2, 0.3], "every case failed")])
def test_auroc_is_nan_with_reason_for_one_class(dice, word):
    value, reason = auroc_failure(dice, [0.3, 0.2, 0.1], 0.5, return_reason=True)
    assert math.isnan(value)
    assert word in reason and "tau=0.5" in reason
    assert math.isnan(auroc_failure(dice, [0.3, 0.2, 0.1], 0.5))
    assert auroc_undefined_reason(dice, 0.5) == reason
    assert auroc_undefined_reason([0.1, 0.9], 0.5) is None


def test_default_tau_is_linear_10th_percentile():
    # 6 sorted values: position 0.1 * (6 - 1) = 0.5 -> halfway between 0.5 and 0.6
    assert default_tau([0.9, 0.5, 1.0, 0.6, 0.8, 0.7]) == pytest.approx(0.55, abs=1e-12)
    rng = np.random.default_rng(0)
    for m in (1, 2, 11, 37):
        values = rng.uniform(size=m)
        s = sorted(values.tolist())
        pos = 0.1 * (m - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, m - 1)
        expected = s[lo] + (pos - lo) * (s[hi] - s[lo])
        assert default_tau(values) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_contains_estimate_and_is_reproducible():
    dice, score = synthetic_cases(300, 11)
    risk = 1 - dice
    point = aurc(risk, score)
    first = bootstrap_ci(aurc, risk, score, n_boot=300, seed=5)
    low, high, used = first
    assert low < point < high and used == 300
    assert bootstrap_ci(aurc, risk, score, n_boot=300, seed=5) == first
    assert bootstrap_ci(aurc, risk, score, n_boot=300, seed=6) != first
    narrow = bootstrap_ci(aurc, risk, score, n_boot=300, seed=5, level=0.5)
    assert low < narrow.low < narrow.high < high


def test_bootstrap_mean_interval_has_the_textbook_width():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, size=400)
    low, high, _ = bootstrap_ci(np.mean, x, n_boot=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.25 * half)


def test_bootstrap_uses_the_same_indices_for_every_array_and_resamples_with_replacement():
    n = 20
    cases = np.arange(n)
    seen = []

    def stat(a, b):
        np.testing.assert_array_equal(b, a * 10)  # same case in both arrays at every position
        seen.append(a.copy())
        return float(a.mean())

    bootstrap_ci(stat, cases, cases * 10, n_boot=50, seed=3)
    assert len(seen) == 50 and all(s.size == n for s in seen)
    assert any(len(set(s.tolist())) < n for s in seen)  # duplicates: with replacement
    assert len({tuple(s.tolist()) for s in seen}) > 1  # different resamples


def test_bootstrap_drops_undefined_resamples_and_reports_how_many_were_used():
    n = 20
    recorded = []

    def stat(a):
        value = float(a.mean()) if 0 in a else math.nan  # undefined when case 0 is missing (p ~ 0.36)
        recorded.append(value)
        return value

    low, high, used = bootstrap_ci(stat, np.arange(n), n_boot=400, seed=2)
    defined = [v for v in recorded if not math.isnan(v)]
    assert len(recorded) == 400
    assert used == len(defined) and 150 < used < 350
    assert (low, high) == pytest.approx(tuple(np.percentile(defined, [2.5, 97.5])), abs=1e-12)
    assert bootstrap_ci(lambda a: math.nan, np.arange(n), n_boot=10) == (pytest.approx(math.nan, nan_ok=True),) * 2 + (0,)


def test_bootstrap_auroc_with_rare_failures_drops_one_class_resamples():
    dice, score = synthetic_cases(40, 0)
    dice = np.maximum(dice, 0.8)
    dice[0] = 0.1  # the only failure
    score[0] = 5.0
    low, high, used = bootstrap_ci(lambda d, s: auroc_failure(d, s, 0.5), dice, score, n_boot=200, seed=0)
    assert 0 < used < 200  # about (39/40)^40 ~ 36% of resamples have no failure
    assert (low, high) == pytest.approx((1.0, 1.0), abs=1e-12)  # every defined resample ranks the failure first


# ---------------------------------------------------------------------------------------------
# summary


def test_summary_values_types_and_json():
    dice, score = synthetic_cases(80, 21)
    other = np.random.default_rng(0).uniform(size=80)
    tau = default_tau(dice)
    out = summarise_failure_detection(dice, {"entropy": score, "random": other}, tau, n_boot=100, seed=1)
    assert out["n_cases"] == 80 and out["n_failures"] == sum(1 for d in dice if d < tau) and out["tau"] == tau
    assert out["n_failures"] > 0
    again = json.loads(json.dumps(out, allow_nan=False))
    assert again == out
    risk = 1 - dice
    for name, s in (("entropy", score), ("random", other)):
        entry = out["scores"][name]
        assert entry["aurc"]["value"] == pytest.approx(aurc(risk, s), rel=1e-12)
        assert entry["e_aurc"]["value"] == pytest.approx(e_aurc(risk, s), rel=1e-12)
        assert entry["auroc"]["value"] == pytest.approx(roc_auc_score(dice < tau, s), abs=1e-12)
        assert entry["auroc_undefined_reason"] is None
        for key in ("aurc", "e_aurc", "auroc"):
            stat = entry[key]
            assert type(stat["value"]) is float and type(stat["low"]) is float and type(stat["n_boot_used"]) is int
            assert stat["low"] <= stat["value"] <= stat["high"]
        assert entry["aurc"]["n_boot_used"] == 100
        sklearn_ci = bootstrap_ci(lambda d, x: auroc_failure(d, x, tau), dice, s, n_boot=100, seed=1)
        assert (entry["auroc"]["low"], entry["auroc"]["high"]) == pytest.approx(sklearn_ci[:2], abs=1e-12)
        assert entry["auroc"]["n_boot_used"] == sklearn_ci.n_used
        assert entry["aurc"] == dict(zip(("low", "high", "n_boot_used"),
                                         bootstrap_ci(aurc, risk, s, n_boot=100, seed=1)), value=entry["aurc"]["value"])
    assert out["scores"]["entropy"]["auroc"]["value"] > out["scores"]["random"]["auroc"]["value"]


def test_summary_without_failures_keeps_aurc_and_explains_auroc():
    dice = np.linspace(0.8, 0.95, 12)
    out = summarise_failure_detection(dice, {"s": np.linspace(1, 0, 12)}, 0.5, n_boot=20)
    entry = out["scores"]["s"]
    assert out["n_failures"] == 0
    assert math.isnan(entry["auroc"]["value"]) and entry["auroc"]["n_boot_used"] == 0
    assert "no failed case" in entry["auroc_undefined_reason"]
    assert math.isfinite(entry["aurc"]["value"]) and entry["aurc"]["n_boot_used"] == 20


def test_augrc_equals_the_naive_generalized_risk_with_ties():
    """AUGRC by explicit loops over every ordering consistent with the scores (ties enumerated), against
    the closed form, and a hand value."""
    from nnunet_mbls.benchmark.failure import augrc

    risk, score = [0.4, 0.1, 0.0, 0.3], [0.5, 0.2, 0.2, 0.9]
    expected = naive_expected_curve(risk, score)  # selective risks r_k
    n = len(risk)
    assert augrc(risk, score) == pytest.approx(sum(k / n * r for k, r in enumerate(expected, 1)) / n, rel=1e-12)
    # no ties: order 1, 0, 3 -> joint risks 0.1/3, 0.5/3, 0.8/3 over n = 3 -> (0.1 + 0.5 + 0.8) / 9
    assert augrc([0.4, 0.1, 0.3], [0.5, 0.2, 0.9]) == pytest.approx(1.4 / 9, rel=1e-12)
