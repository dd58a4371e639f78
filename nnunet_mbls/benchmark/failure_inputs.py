"""The per-case inputs of the failure-detection statistics (:mod:`nnunet_mbls.benchmark.failure`).

Checks that turn a per-case array (one value per case) into a 1-D float64 array of finite numbers, or raise
``ValueError`` naming the argument and the fix, and the orientation of a score (higher = more doubtful).
"""

from __future__ import annotations

import math

import numpy as np


def _as_cases(values, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers, or ValueError naming ``name``."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, one per case; got {type(values).__name__} "
                         f"that numpy cannot turn into floats ({e})") from e
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one value per case); got shape {array.shape}; "
                         "pass one number per case, e.g. the mean Dice over foreground classes")
    if array.size == 0 and not allow_empty:
        raise ValueError(f"`{name}` is empty; pass at least one case")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"`{name}` contains {array[i]} at case index {i} ({bad.size} non-finite of {array.size}); "
                         "drop cases without a defined value (e.g. Dice of an empty reference and empty prediction) "
                         "from every array first")
    return array


def _as_dice(values, name: str = "dice") -> np.ndarray:
    dice = _as_cases(values, name)
    outside = np.flatnonzero((dice < 0) | (dice > 1))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"`{name}` must lie in [0, 1]; case index {i} has {dice[i]}; "
                         "pass Dice as a fraction (divide percentages by 100)")
    return dice


def _same_length(**arrays: np.ndarray) -> None:
    (first_name, first), *rest = arrays.items()
    for name, array in rest:
        if array.size != first.size:
            raise ValueError(f"`{name}` has {array.size} values but `{first_name}` has {first.size}; "
                             "pass one value per case, in the same case order, in every array")


def _as_tau(tau) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`tau` must be a number (the Dice below which a case counts as failed); got {tau!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"`tau` must be finite; got {value}; use default_tau(baseline_dice) or a Dice in [0, 1]")
    return value


def as_uncertainty(score, *, higher_is_doubtful: bool) -> np.ndarray:
    """The score oriented so that higher = more doubtful, as every function here expects.

    Negation keeps ties and the order reversed exactly, so AURC/AUROC of ``-confidence`` are those
    of the confidence read the right way round.

    Args:
        score: shape (n,), one finite number per case.
        higher_is_doubtful: ``True`` for an uncertainty (entropy, variance): returned unchanged; ``False``
            for a confidence (e.g. the pairwise Dice between fold predictions): returned as ``-score``.

    Returns:
        float64 array of shape (n,), a new array.

    Raises:
        ValueError: ``higher_is_doubtful`` is not a bool, or ``score`` is not a non-empty 1-D sequence of
            finite numbers.
    """
    if not isinstance(higher_is_doubtful, (bool, np.bool_)):
        raise ValueError(f"`higher_is_doubtful` must be True or False; got {higher_is_doubtful!r}; "
                         "True for an uncertainty (entropy, variance), False for a confidence (fold agreement)")
    array = _as_cases(score, "score")
    return array.copy() if higher_is_doubtful else -array
