"""Cross entropy: the plain baseline (no Dice term)."""

from __future__ import annotations

from torch import Tensor

from .base import SegmentationLoss, cross_entropy_map, float32_no_autocast, masked_mean


class CELoss(SegmentationLoss):
    """Mean cross entropy over the non-ignored voxels.

    Args:
        ignore_label: label value whose voxels are excluded (nnU-Net's ignore label), or None.

    Shapes: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross entropy of ``logits`` against ``target``, computed in float32.

        ``logits`` (B, C, *spatial), ``target`` (B, 1, *spatial) or (B, *spatial), and the errors: as
        :meth:`SegmentationLoss.prepare`. Returns the scalar mean over the non-ignored voxels (0 if none).
        """
        logits, target, mask = self.prepare(logits, target)
        return masked_mean(cross_entropy_map(logits, target), mask)
