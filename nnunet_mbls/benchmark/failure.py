"""Failure detection: how well a per-case uncertainty score flags failed segmentations.

This is the practical payoff of calibration as measured by ValUES (Kahl et al., ICLR 2024,
IML-DKFZ/values) and the segmentation failure-detection benchmark of Zenk et al. (MedIA 2025): a
trainer whose probabilities are better calibrated should give a per-case uncertainty that ranks
its bad cases last.

Inputs are per-case 1-D arrays of one length ``n`` (one entry per case, the same case order in
every array):

* ``dice`` -- segmentation quality in [0, 1], higher is better; the **risk** of a case is
  ``1 - dice``.
* ``score`` -- uncertainty, **higher = more doubtful**. A quantity where lower is more doubtful
  (a confidence, e.g. the pairwise Dice between fold predictions) is turned into one with
  :func:`as_uncertainty` (``higher_is_doubtful=False`` negates it), or negated by the caller.

Cases without a defined Dice (NaN, e.g. empty reference and empty prediction) must be dropped from
every array by the caller; every function here raises ``ValueError`` on NaN or infinite input.

Conventions (stated once here, repeated where they matter):

* **Ordering and ties.** Cases are accepted in ascending ``score`` (most confident first). Within
  a group of cases with exactly equal scores no order is preferred: every curve value and every
  area is the **expected value over uniformly random orderings of the tied cases**. Because the
  selective risk at a fixed coverage is linear in the risks of the accepted cases, this equals
  giving every prefix position inside a tie group the group's mean risk.
* **Selective risk** at coverage ``k/n`` is the mean risk of the ``k`` most confident cases,
  ``k = 1..n`` (coverage 0 is not a point of the curve).
* **AURC** is the discrete definition of Geifman et al. (ICLR 2019), ``(1/n) sum_k r_k``, the
  mean of the ``n`` selective risks. This is the formula ValUES' ``eaurc`` uses for the optimal
  ranking; ValUES' (fd-shifts') ``aurc`` instead integrates a trapezoid over the distinct score
  thresholds, which without ties is ``(1/n) [sum_k r_k - (r_1 + r_n) / 2]`` -- an O(1/n)
  difference -- so our E-AURC of a perfect ranking is exactly 0 where theirs is not.
* **E-AURC** = AURC - AURC of the optimal ranking (cases sorted by their true risk).
* **Failure** of a case: ``dice < tau`` (strictly). ``tau`` is usually :func:`default_tau`, the
  10th percentile of the baseline trainer's Dice on the same cases, and it is held fixed inside
  the bootstrap.
* **Intervals** are percentile bootstraps over cases (:func:`bootstrap_ci`).

The input checks and :func:`as_uncertainty` live in :mod:`.failure_inputs`, the plot
(:func:`plot_risk_coverage`) in :mod:`.failure_plot`; both are importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..defaults import TAU_PERCENTILE
from .failure_inputs import _as_cases, _as_dice, _as_tau, _same_length, as_uncertainty  # noqa: F401 (re-exported)
from .bootstrap import BootstrapInterval, bootstrap_ci  # noqa: F401 (re-exported)
from .failure_plot import plot_risk_coverage  # noqa: F401 (re-exported)

#: the former name of :data:`nnunet_mbls.defaults.TAU_PERCENTILE` (see :func:`default_tau`)
DEFAULT_TAU_PERCENTILE = TAU_PERCENTILE


# ----------------------------------------------------------------------------------------------
# risk-coverage curve, AURC, E-AURC


def _tie_averaged_risk(risk: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Risks in ascending-score order, each tie group's entries replaced by the group's mean risk.

    A group whose risks are all equal keeps that value exactly (no sum/count rounding), so a
    perfect ranking reproduces ``np.sort(risk)`` bit for bit.
    """
    order = np.argsort(score, kind="stable")
    sorted_score, sorted_risk = score[order], risk[order]
    _, start, counts = np.unique(sorted_score, return_index=True, return_counts=True)
    if counts.size == sorted_risk.size:  # no ties
        return sorted_risk
    group_sum = np.add.reduceat(sorted_risk, start)
    group_min = np.minimum.reduceat(sorted_risk, start)
    group_max = np.maximum.reduceat(sorted_risk, start)
    group_mean = np.where(group_min == group_max, group_min, group_sum / counts)
    return np.repeat(group_mean, counts)


def _risk_and_score(risk, score) -> tuple[np.ndarray, np.ndarray]:
    risk = _as_cases(risk, "risk")
    score = _as_cases(score, "score")
    _same_length(risk=risk, score=score)
    return risk, score


def risk_coverage(risk, score) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: cases accepted in ascending score (most confident first).

    Ties: for cases with exactly equal scores the value is the expected one over uniformly random
    orderings of the tied cases, i.e. every prefix position inside a tie group contributes the
    group's mean risk. (A score constant over all cases gives ``mean(risk)`` at every coverage.)

    Args:
        risk: shape (n,), the per-case risk (``1 - dice``; any finite numbers).
        score: shape (n,), uncertainty, higher = more doubtful.

    Returns:
        ``(coverage, selective_risk)``, both float64 of shape (n,): ``coverage[k-1] = k/n`` and
        ``selective_risk[k-1]`` is the mean risk of the ``k`` most confident cases, ``k = 1..n``.

    Raises:
        ValueError: an input is not a non-empty 1-D sequence of finite numbers, or the lengths differ.
    """
    risk, score = _risk_and_score(risk, score)
    n = risk.size
    k = np.arange(1, n + 1, dtype=np.float64)
    return k / n, np.cumsum(_tie_averaged_risk(risk, score)) / k


def aurc(risk, score) -> float:
    """Area under the risk-coverage curve, discrete definition of Geifman et al. (ICLR 2019).

    ``AURC = (1/n) * sum_{k=1..n} r_k`` with ``r_k`` the selective risk at coverage ``k/n`` of
    :func:`risk_coverage` (ties: expectation over random orderings of tied cases). This is not the
    trapezoid over distinct thresholds of ValUES'/fd-shifts' ``aurc`` (see the module docstring; the two
    differ by O(1/n)).

    Args:
        risk: shape (n,), the per-case risk (``1 - dice``).
        score: shape (n,), uncertainty, higher = more doubtful.

    Returns:
        The AURC; lower is better; a score constant over all cases gives ``mean(risk)``.

    Raises:
        ValueError: as :func:`risk_coverage`.
    """
    _, selective = risk_coverage(risk, score)
    return float(np.mean(selective))


def augrc(risk, score) -> float:
    """Area under the generalized risk-coverage curve (Traub et al., NeurIPS 2024), discrete as :func:`aurc`.

    The generalized risk at coverage ``k/n`` is the joint risk ``(1/n) * sum of the k most confident cases'
    risks`` = ``(k/n) * r_k`` (not divided by the accepted cases only): it weighs a failure by how likely it is to
    be accepted, so it does not reward rejecting a few very confident cases as AURC can. ``AUGRC = (1/n) *
    sum_k (k/n) r_k``; ties as in :func:`risk_coverage`.

    Args:
        risk: shape (n,), the per-case risk (``1 - dice``).
        score: shape (n,), uncertainty, higher = more doubtful.

    Returns:
        The AUGRC in [0, mean(risk)]; lower is better.

    Raises:
        ValueError: as :func:`risk_coverage`.
    """
    coverage, selective = risk_coverage(risk, score)
    return float(np.mean(coverage * selective))


def optimal_aurc(risk) -> float:
    """AURC of the optimal ranking: cases accepted in ascending true risk.

    Args:
        risk: shape (n,), the per-case risk.

    Returns:
        The optimal AURC.

    Raises:
        ValueError: ``risk`` is not a non-empty 1-D sequence of finite numbers.
    """
    risk = _as_cases(risk, "risk")
    k = np.arange(1, risk.size + 1, dtype=np.float64)
    return float(np.mean(np.cumsum(np.sort(risk)) / k))


def e_aurc(risk, score) -> float:
    """Excess AURC: ``aurc(risk, score) - optimal_aurc(risk)``.

    Args:
        risk: shape (n,), the per-case risk.
        score: shape (n,), uncertainty, higher = more doubtful.

    Returns:
        0 (exactly) for a ranking that sorts the cases by their true risk (ties in the score only
        among cases of equal risk); maximal for the reversed ranking (highest risk accepted first).
        Mathematically >= 0 (rounding can leave a few ulps either side of the true value).

    Raises:
        ValueError: as :func:`risk_coverage`.
    """
    risk, score = _risk_and_score(risk, score)
    return aurc(risk, score) - optimal_aurc(risk)


# ----------------------------------------------------------------------------------------------
# failures and AUROC


def default_tau(baseline_dice) -> float:
    """The failure threshold: the :data:`~nnunet_mbls.defaults.TAU_PERCENTILE`-th (10th) percentile of the
    baseline trainer's per-case Dice.

    numpy's ``percentile`` with linear interpolation between order statistics (``method="linear"``,
    numpy's default: position ``0.1 * (m - 1)`` in the sorted values).

    Args:
        baseline_dice: shape (m,), the baseline's Dice on the same cases as the trainers being compared.

    Returns:
        τ, a float.

    Raises:
        ValueError: ``baseline_dice`` is not a non-empty 1-D sequence of finite numbers in [0, 1].
    """
    dice = _as_dice(baseline_dice, "baseline_dice")
    return float(np.percentile(dice, TAU_PERCENTILE, method="linear"))


def failure_labels(dice, tau) -> np.ndarray:
    """Which cases failed, i.e. ``dice < tau`` (strictly).

    Args:
        dice: shape (n,), Dice per case in [0, 1].
        tau: the failure threshold, a finite number.

    Returns:
        Boolean array of shape (n,), True where a case failed.

    Raises:
        ValueError: ``dice`` is not a non-empty 1-D sequence of finite numbers in [0, 1], or ``tau`` is not
            a finite number.
    """
    return _as_dice(dice) < _as_tau(tau)


def auroc_undefined_reason(dice, tau) -> str | None:
    """Why the failure AUROC is undefined for these cases (one class only), or None when defined.

    Args:
        dice: shape (n,), Dice per case in [0, 1].
        tau: the failure threshold.

    Returns:
        A sentence (no failed case, or every case failed), or None.

    Raises:
        ValueError: as :func:`failure_labels`.
    """
    failed = failure_labels(dice, tau)
    n, k = failed.size, int(failed.sum())
    if k == 0:
        return f"no failed case: all {n} cases have Dice >= tau={float(tau):.4g}"
    if k == n:
        return f"every case failed: all {n} cases have Dice < tau={float(tau):.4g}"
    return None


def auroc_failure(dice, score, tau, *, return_reason: bool = False) -> float | tuple[float, str | None]:
    """ROC AUC of ``score`` for detecting failed cases (failure: ``dice < tau``).

    Computed by ``sklearn.metrics.roc_auc_score(dice < tau, score)``; tied scores count 1/2 (Mann-Whitney).

    Args:
        dice: shape (n,), Dice per case in [0, 1].
        score: shape (n,), an uncertainty (higher = more doubtful), so 1.0 means every failed case is more
            doubtful than every successful one and 0.5 is chance.
        tau: the failure threshold.
        return_reason: also return why the AUROC is undefined (default False).

    Returns:
        The AUROC; NaN when only one class is present (no failure, or every case failed). With
        ``return_reason=True`` ``(auroc, reason)``, reason None when defined and otherwise the
        sentence of :func:`auroc_undefined_reason`.

    Raises:
        ValueError: an input is not a non-empty 1-D sequence of finite numbers (Dice in [0, 1]), the lengths
            differ, or ``tau`` is not a finite number.
    """
    dice = _as_dice(dice)
    score = _as_cases(score, "score")
    _same_length(dice=dice, score=score)
    reason = auroc_undefined_reason(dice, tau)
    if reason is not None:
        value = math.nan
    else:
        from sklearn.metrics import roc_auc_score

        value = float(roc_auc_score(dice < float(tau), score))
    return (value, reason) if return_reason else value


def _auroc_mann_whitney(failed: np.ndarray, score: np.ndarray) -> float:
    """The same AUROC as ``roc_auc_score(failed, score)`` from average ranks (Mann-Whitney U / (n1 n0)).

    About 50x faster than scikit-learn's input checks, for the bootstrap of
    :func:`summarise_failure_detection`; NaN with one class. Inputs already validated.
    """
    from scipy.stats import rankdata

    n_failed = int(failed.sum())
    n_ok = failed.size - n_failed
    if n_failed == 0 or n_ok == 0:
        return math.nan
    rank_sum = float(rankdata(score)[failed].sum())
    return (rank_sum - n_failed * (n_failed + 1) / 2.0) / (n_failed * n_ok)


# ----------------------------------------------------------------------------------------------
# bootstrap


def summarise_failure_detection(dice, scores: Mapping[str, Sequence[float] | np.ndarray], tau, *,
                                n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AURC, E-AURC, AUGRC and failure AUROC of every score, each with its bootstrap interval.

    Risk is ``1 - dice``. Every interval of every score uses the same resamples (:func:`bootstrap_ci`
    with ``seed``). The AUROC point value is :func:`auroc_failure` (scikit-learn); inside the bootstrap
    the identical statistic is computed from average ranks (Mann-Whitney), which is much faster and
    equal to rounding.

    Args:
        dice: shape (n,), Dice per case in [0, 1].
        scores: name -> uncertainty of shape (n,) (higher = more doubtful; orient confidences with
            :func:`as_uncertainty` first).
        tau: failure threshold (failure: ``dice < tau``), held fixed in the bootstrap.
        n_boot: bootstrap resamples (default 1000).
        seed: seed of the resampling (default 0).
        level: interval level (default 0.95).

    Returns:
        Plain Python values (JSON-serialisable; NaN for undefined values, as ``json`` writes them)::

            {"n_cases": int, "n_failures": int, "tau": float,
             "risk": "1 - dice", "failure": "dice < tau",
             "interval": {"method": "percentile bootstrap over cases", "n_boot": int, "seed": int, "level": float},
             "scores": {name: {"aurc":   {"value": float, "low": float, "high": float, "n_boot_used": int},
                               "e_aurc": {... same keys ...},
                               "augrc":  {... same keys ...},
                               "auroc":  {... same keys ...},
                               "auroc_undefined_reason": str | None}}}

    Raises:
        ValueError: bad ``dice`` or ``tau``; ``scores`` is not a dict, has a non-string key, or a score that
            is not a 1-D sequence of finite numbers of length n; bad ``n_boot`` or ``level``.
    """
    dice = _as_dice(dice)
    tau = _as_tau(tau)
    if not isinstance(scores, Mapping):
        raise ValueError(f"`scores` must be a dict name -> per-case uncertainty array; got {type(scores).__name__}")
    risk = 1.0 - dice
    failed = dice < tau
    out_scores = {}
    for name, values in scores.items():
        if not isinstance(name, str):
            raise ValueError(f"`scores` keys must be strings (score names); got {name!r}")
        score = _as_cases(values, f"scores[{name!r}]")
        _same_length(dice=dice, **{f"scores[{name!r}]": score})
        auroc, reason = auroc_failure(dice, score, tau, return_reason=True)
        entry = {}
        for key, value, fn, arrays in (
            ("aurc", aurc(risk, score), aurc, (risk, score)),
            ("e_aurc", e_aurc(risk, score), e_aurc, (risk, score)),
            ("augrc", augrc(risk, score), augrc, (risk, score)),
            ("auroc", auroc, _auroc_mann_whitney, (failed, score)),
        ):
            low, high, used = bootstrap_ci(fn, *arrays, n_boot=n_boot, seed=seed, level=level)
            entry[key] = {"value": float(value), "low": low, "high": high, "n_boot_used": used}
        entry["auroc_undefined_reason"] = reason
        out_scores[name] = entry
    return {
        "n_cases": int(dice.size),
        "n_failures": int(failed.sum()),
        "tau": tau,
        "risk": "1 - dice",
        "failure": "dice < tau",
        "interval": {"method": "percentile bootstrap over cases", "n_boot": int(n_boot), "seed": int(seed),
                     "level": float(level)},
        "scores": out_scores,
    }

