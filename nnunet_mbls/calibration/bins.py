"""Equal-width confidence bins, (lower, upper] as the paper's code bins them: the one binning of every ECE here."""

from __future__ import annotations

from torch import Tensor


def bin_index(p: Tensor, n_bins: int) -> Tensor:
    """Bin of each probability: clamp(ceil(p * n_bins) - 1, 0, n_bins - 1), i.e. (lower, upper] bins.

    Args:
        p: probabilities, any shape, float.
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        int64 tensor of the same shape as ``p``, values in [0, n_bins).
    """
    return _float_bin_index(p, n_bins).long()


def _float_bin_index(p: Tensor, n_bins: int) -> Tensor:
    """:func:`bin_index` as a new float tensor of p's dtype (small integers are exact; float ops are faster)."""
    return (p * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1)
