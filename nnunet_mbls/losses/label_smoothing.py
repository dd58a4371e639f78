"""Label smoothing (Szegedy et al.) with a uniform target that includes the true class."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from .base import SegmentationLoss, check_unit_interval, float32_no_autocast, masked_mean


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
        """``{"alpha": α}``, for logs and tables."""
        return {"alpha": self.alpha}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Label-smoothed cross entropy of ``logits`` against ``target``, computed in float32.

        ``logits`` (B, C, *spatial), ``target`` (B, 1, *spatial) or (B, *spatial), and the errors: as
        :meth:`SegmentationLoss.prepare`. Returns the scalar mean over the non-ignored voxels (0 if none).
        """
        logits, target, mask = self.prepare(logits, target)
        # torch's label smoothing is exactly this target: one log_softmax instead of log_softmax + logsumexp
        per_voxel = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.alpha)
        return masked_mean(per_voxel, mask)
