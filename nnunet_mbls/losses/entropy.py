"""Confidence penalty (ECP, Pereyra et al.): cross entropy minus a weighted entropy bonus."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SegmentationLoss, check_unit_interval, float32_no_autocast, masked_mean
from .fused import VoxelTerms, nll, subtract_onehot_, voxelwise_loss


class _EntropyPenaltyTerms(VoxelTerms):
    """Per voxel −log p_y + w · Σ_k p_k log p_k.

    Gradient: softmax − onehot + w · p_k (log p_k − Σ_j p_j log p_j).
    """

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def value(self, x: Tensor, t: Tensor) -> Tensor:
        """Per-voxel −log p_y + w · Σ_k p_k log p_k.

        Args:
            x: (B, C, n) float32 logits of a chunk (not modified).
            t: (B, 1, n) int64 labels.

        Returns:
            (B, n) loss per voxel.
        """
        log_p = torch.log_softmax(x, dim=1)
        return nll(log_p, t).add_((log_p.exp() * log_p).sum(dim=1), alpha=self.weight)

    def gradient(self, x: Tensor, grad: Tensor, t: Tensor) -> Tensor:
        """Gradient softmax − onehot + w · p_k (log p_k − Σ_j p_j log p_j), times ``grad``.

        Args:
            x: (B, C, n) float32 logits of a chunk (not modified).
            grad: (B, 1, n) incoming gradient of each voxel's loss.
            t: (B, 1, n) int64 labels.

        Returns:
            (B, C, n) new tensor: the gradient with respect to ``x``.
        """
        log_p = torch.log_softmax(x, dim=1)  # finite even where p underflows to 0, unlike log(p)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(dim=1, keepdim=True)
        d = log_p.sub_(neg_entropy).mul_(self.weight).add_(1).mul_(p)  # p + w · p (log p − Σ p log p)
        return subtract_onehot_(d, t).mul_(grad)


class EntropyPenaltyLoss(SegmentationLoss):
    """CE − α · mean over voxels and classes of (−p_k log p_k).

    Args:
        alpha: weight α in [0, 1) of the entropy term (authors' default 0.1).
        ignore_label: label value whose voxels are excluded, or None.

    Shapes: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    Evaluated chunk-wise with a hand-written gradient (see :mod:`nnunet_mbls.losses.fused`).
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
        """CE − α · mean entropy of ``logits`` against ``target``, computed in float32.

        ``logits`` (B, C, *spatial), ``target`` (B, 1, *spatial) or (B, *spatial), and the errors: as
        :meth:`SegmentationLoss.prepare`. Returns the scalar mean over the non-ignored voxels (0 if none).
        """
        logits, target, mask = self.prepare(logits, target)
        per_voxel = voxelwise_loss(logits, _EntropyPenaltyTerms(self.alpha / logits.shape[1]), target)
        return masked_mean(per_voxel, mask)
