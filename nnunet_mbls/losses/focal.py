"""Focal loss (Lin et al.), mean over voxels as in the MbLS authors' code."""

from __future__ import annotations

from torch import Tensor

from .base import SegmentationLoss, check_non_negative, cross_entropy_map, float32_no_autocast, masked_mean


class FocalLoss(SegmentationLoss):
    """−(1 − p_t)^γ · log p_t, averaged over the non-ignored voxels. γ = 0 is cross entropy.

    Args:
        gamma: focusing parameter γ >= 0 (authors' default 3).
        ignore_label: label value whose voxels are excluded, or None.

    Shapes: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    def __init__(self, gamma: float = 3.0, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.gamma = check_non_negative("gamma", gamma)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        """``{"gamma": γ}``, for logs and tables."""
        return {"gamma": self.gamma}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Focal loss of ``logits`` against ``target``, computed in float32.

        ``logits`` (B, C, *spatial), ``target`` (B, 1, *spatial) or (B, *spatial), and the errors: as
        :meth:`SegmentationLoss.prepare`. Returns the scalar mean over the non-ignored voxels (0 if none).
        """
        logits, target, mask = self.prepare(logits, target)
        nll = cross_entropy_map(logits, target)
        p_true = (-nll).exp()
        return masked_mean((1 - p_true).pow(self.gamma) * nll, mask)
