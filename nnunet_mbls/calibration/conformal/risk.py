"""The finite-sample rules of conformal risk control and split conformal prediction, on a threshold grid.

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, ICLR 2024): for losses L_i(λ) that are
non-increasing in λ, bounded by B, with L_i(λ_max) ≤ α, the threshold

    λ̂ = inf { λ : n/(n+1) · R̂_n(λ) + B/(n+1) ≤ α },   R̂_n = mean of the n calibration losses,

gives E[L_{n+1}(λ̂)] ≤ α for an exchangeable test case (Theorem 1 there). On a grid λ_0 < ... < λ_G the infimum
is over the grid. A loss that is not monotone is replaced by its running maximum from the conservative end
(:func:`monotone_upper`), which bounds it from above, so the guarantee carries over to the original loss.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import InputError


class ConformalError(InputError):
    """Conformal calibration is impossible with these inputs; the message names the argument and the fix."""


def check_alpha(alpha: float, name: str = "--alpha") -> float:
    """α as a float in (0, 1), else a :class:`ConformalError` naming ``name``."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ConformalError(f"{name} {alpha!r} must lie strictly between 0 and 1 (e.g. {name} 0.1 for 10%)")
    return value


def min_cases(alpha: float, bound: float = 1.0) -> int:
    """The fewest calibration cases for which a risk α is achievable: B/(n+1) ≤ α ⟺ n ≥ B/α − 1."""
    return max(1, math.ceil(bound / alpha - 1 - 1e-12))


def monotone_upper(losses: np.ndarray) -> np.ndarray:
    """(n, G+1) losses made non-increasing along the grid: L̃(λ_g) = max over g' ≥ g of L(λ_g') (an upper bound)."""
    return np.maximum.accumulate(np.asarray(losses, dtype=np.float64)[:, ::-1], axis=1)[:, ::-1]


def crc_index(losses: np.ndarray, alpha: float, bound: float = 1.0, what: str = "the risk") -> int:
    """The conformal risk control threshold on a grid.

    Args:
        losses: (n, G+1) loss of each calibration case at each grid point λ_0 < ... < λ_G, non-increasing along the
            grid (see :func:`monotone_upper`), in [0, ``bound``], with every loss at λ_G ≤ α.
        alpha: the risk level α in (0, 1).
        bound: B, the loss's upper bound (1 for FNR and FDR).
        what: what the losses measure, for messages.

    Returns:
        ĝ, the smallest grid index with n/(n+1)·R̂_n(λ_g) + B/(n+1) ≤ α.

    Raises:
        ConformalError: too few cases (n < B/α − 1), or losses that are not non-increasing, out of [0, B], or above
            α at the last grid point.
    """
    alpha = check_alpha(alpha)
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] < 1:
        raise ConformalError(f"{what}: losses must be (cases, grid points), got shape {losses.shape}")
    n = losses.shape[0]
    needed = min_cases(alpha, bound)
    if n < needed:
        raise ConformalError(f"{what} at alpha {alpha:g} needs at least {needed} calibration cases (n/(n+1) risk + "
                             f"{bound:g}/(n+1) <= alpha), got {n}: add labelled cases or raise --alpha to at least "
                             f"{bound / (n + 1):.3g}")
    if not np.isfinite(losses).all() or losses.min() < 0 or losses.max() > bound + 1e-12:
        raise ConformalError(f"{what}: losses must lie in [0, {bound:g}]")
    if (np.diff(losses, axis=1) > 1e-12).any():
        raise ConformalError(f"{what}: losses must be non-increasing along the grid (use monotone_upper)")
    if losses[:, -1].max() > alpha:
        raise ConformalError(f"{what}: the loss at the most conservative threshold exceeds alpha {alpha:g}; "
                             f"no threshold of the grid can control it")
    adjusted = n / (n + 1) * losses.mean(axis=0) + bound / (n + 1)
    return int(np.flatnonzero(adjusted <= alpha + 1e-12)[0])


def conformal_rank(n: int, alpha: float) -> int:
    """⌈(n+1)(1−α)⌉: the rank (1-based) of the calibration score that bounds a new one with probability ≥ 1 − α.

    Raises:
        ConformalError: the rank exceeds n (too few cases for this α).
    """
    alpha = check_alpha(alpha)
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-12)
    if rank > n:
        raise ConformalError(f"an interval with coverage {1 - alpha:g} needs at least {min_cases(alpha)} calibration "
                             f"cases, got {n}: add labelled cases or raise --alpha to at least {1 / (n + 1):.3g}")
    return rank


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ⌈(n+1)(1−α)⌉-th smallest of ``scores``: P(score_{n+1} ≤ it) ≥ 1 − α for an exchangeable new case."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    return float(scores[conformal_rank(scores.size, alpha) - 1])
