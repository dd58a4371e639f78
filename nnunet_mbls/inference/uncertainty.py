"""Voxel uncertainty of softmax probabilities and of a fold ensemble: entropy, mutual information, fold Dice.

Pure torch/numpy. Entropy is in nats, with 0 log 0 = 0, so it lies in [0, ln C]. The fold statistics
follow the usual decomposition of an ensemble's uncertainty (BALD): with p_k the probabilities of fold
k and p̄ their mean, mutual information MI = H(p̄) − mean_k H(p_k) ≥ 0 (Jensen), 0 for one fold. They are
kept as running sums (Σ p_k, Σ H(p_k) and one uint8 label map per fold), never as every fold's
probabilities at once.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

#: voxels per chunk of the entropy computation: a few (C, CHUNK) float32 temporaries whatever the image
CHUNK_VOXELS = 2**20


def entropy(probs: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Predictive entropy −Σ_k p_k ln p_k over the class axis, in nats.

    0 · ln 0 counts as 0; computed in float32 chunks of :data:`CHUNK_VOXELS` voxels, and rounding below 0
    is clipped.

    Args:
        probs: (C, *spatial) probabilities, numpy or tensor, any float dtype.

    Returns:
        (*spatial) float32 entropy, same type as the input (numpy in, numpy out; a tensor stays on its device).
    """
    is_numpy = isinstance(probs, np.ndarray)
    p = torch.as_tensor(probs)
    flat = p.reshape(p.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32, device=p.device)
    for s in range(0, flat.shape[1], CHUNK_VOXELS):
        chunk = flat[:, s : s + CHUNK_VOXELS].float()
        out[s : s + CHUNK_VOXELS] = -torch.special.xlogy(chunk, chunk).sum(0)
    out = out.clamp_(min=0).reshape(p.shape[1:])
    return out.numpy() if is_numpy else out


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> list[float]:
    """Dice of two label maps for each label.

    Args:
        a: integer label map, any shape.
        b: integer label map of the same shape.
        labels: the label values to compare.

    Returns:
        One Dice per label, in the order of ``labels``; NaN where both maps lack the label.
    """
    out = []
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        out.append(2.0 * int(np.count_nonzero(in_a & in_b)) / total if total else float("nan"))
    return out


def mean_pairwise_dice(segmentations: Sequence[np.ndarray], labels: Sequence[int]) -> float:
    """Mean over fold pairs of the mean foreground Dice between their segmentations (NaN with < 2 folds).

    Per pair, labels empty in both segmentations are left out; a pair where every label is empty in both
    counts as agreement (1.0).

    Args:
        segmentations: one label map per fold, all of one shape.
        labels: the foreground label values.

    Returns:
        The mean, a float; NaN with fewer than 2 segmentations.
    """
    if len(segmentations) < 2:
        return float("nan")
    pairs = []
    for a, b in itertools.combinations(segmentations, 2):
        values = [d for d in dice_per_label(a, b, labels) if not np.isnan(d)]
        pairs.append(float(np.mean(values)) if values else 1.0)
    return float(np.mean(pairs))


class FoldStatistics:
    """Running sums over the folds' probabilities of one case (network grid), for MI and fold agreement.

    Args:
        keep_probabilities: sum the probabilities and entropies (needed for mutual information).
        keep_segmentations: keep each fold's argmax as uint8 (needed for pairwise fold Dice).
    """

    def __init__(self, keep_probabilities: bool, keep_segmentations: bool) -> None:
        self.keep_probabilities, self.keep_segmentations = keep_probabilities, keep_segmentations
        self.num_folds = 0
        self.prob_sum: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.segmentations: list[np.ndarray] = []

    def add(self, logits: Tensor) -> None:
        """Add one fold's prediction to the running sums (with neither keep flag only the fold count grows).

        Args:
            logits: (C, *spatial) logits of one fold, any float dtype; softmax is taken in float32.
        """
        self.num_folds += 1
        if not (self.keep_probabilities or self.keep_segmentations):
            return
        probs = torch.softmax(logits.float(), dim=0)
        if self.keep_probabilities:
            h = entropy(probs)
            self.prob_sum = probs if self.prob_sum is None else self.prob_sum.add_(probs)
            self.entropy_sum = h if self.entropy_sum is None else self.entropy_sum.add_(h)
        if self.keep_segmentations:
            self.segmentations.append(logits.argmax(0).to(torch.uint8 if logits.shape[0] <= 256 else torch.int16).cpu().numpy())

    def mutual_information(self) -> Tensor:
        """Mutual information H(mean_k p_k) − mean_k H(p_k) over the folds added.

        Returns:
            (*spatial) float32 tensor in nats, ≥ 0 (float rounding clipped); 0 with one fold.

        Raises:
            ValueError: built without ``keep_probabilities``, or no fold added yet.
        """
        if self.prob_sum is None:
            raise ValueError("mutual information needs keep_probabilities=True and at least one fold added")
        return (entropy(self.prob_sum / self.num_folds) - self.entropy_sum / self.num_folds).clamp_(min=0)

    def fold_dice(self, labels: Sequence[int]) -> float:
        """Mean pairwise Dice of the folds' segmentations (:func:`mean_pairwise_dice`).

        Args:
            labels: the foreground label values.

        Returns:
            The mean, a float; NaN with fewer than 2 folds kept (built without ``keep_segmentations``: none).
        """
        return mean_pairwise_dice(self.segmentations, labels)
