"""Confidence penalty (ECP, Pereyra et al.): cross entropy minus a weighted entropy bonus."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SegmentationLoss, check_unit_interval, cross_entropy_map, float32_no_autocast, masked_mean


class EntropyPenaltyLoss(SegmentationLoss):
    """CE − α · mean over voxels and classes of (−p_k log p_k).

    Args:
        alpha: weight α in [0, 1) of the entropy term (authors' default 0.1).
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
        log_p = torch.log_softmax(logits, dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1)
        per_voxel = cross_entropy_map(logits, target) - (self.alpha / logits.shape[1]) * entropy
        return masked_mean(per_voxel, mask)
