"""Label smoothing (Szegedy et al.) with a uniform target that includes the true class."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SegmentationLoss, check_unit_interval, cross_entropy_map, float32_no_autocast, masked_mean


class LabelSmoothingLoss(SegmentationLoss):
    """(1 − α) · NLL + α · mean_k(−log p_k), averaged over the non-ignored voxels.

    Equivalent to cross entropy against the target (1 − α) · onehot(y) + α / C.

    Args:
        alpha: smoothing α in [0, 1) (authors' default 0.1).
        ignore_label: label value whose voxels are excluded, or None.

    Shapes: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    def __init__(self, alpha: float = 0.1, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.alpha = check_unit_interval("alpha", alpha)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, mask = self.prepare(logits, target)
        nll = cross_entropy_map(logits, target)
        mean_neg_log_p = torch.logsumexp(logits, dim=1) - logits.mean(dim=1)
        return masked_mean((1 - self.alpha) * nll + self.alpha * mean_neg_log_p, mask)
