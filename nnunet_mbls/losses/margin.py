"""Margin-based label smoothing (MbLS, Murugesan et al., MedIA 2023) and its Dice+CE variant."""

from __future__ import annotations

from torch import Tensor

from .base import (
    SegmentationLoss,
    check_non_negative,
    cross_entropy_map,
    float32_no_autocast,
    masked_mean,
)


def margin_penalty_map(logits: Tensor, margin: float) -> Tensor:
    """Σ_k relu(max_j l_j − l_k − margin) per voxel: (B, C, *spatial) -> (B, *spatial)."""
    max_logit = logits.max(dim=1, keepdim=True).values
    return (max_logit - logits - margin).clamp_min(0).sum(dim=1)


class MbLSLoss(SegmentationLoss):
    """CE + λ · mean over voxels and classes of relu(max_j l_j − l_k − m), on raw logits.

    The penalty is reduced by a mean over voxels AND classes, as in the authors' code; there is
    no Dice term. With ``margin`` larger than any logit gap the loss equals cross entropy.

    Args:
        margin: m >= 0, the tolerated logit distance (authors' default 10).
        lam: λ >= 0, weight of the penalty (authors' default 0.1).
        ignore_label: label value whose voxels are excluded, or None.

    Shapes: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    def __init__(self, margin: float = 10.0, lam: float = 0.1, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.margin = check_non_negative("margin", margin)
        self.lam = check_non_negative("lam", lam)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"margin": self.margin, "lam": self.lam}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, mask = self.prepare(logits, target)
        per_voxel = cross_entropy_map(logits, target)
        if self.lam > 0:
            per_voxel = per_voxel + (self.lam / logits.shape[1]) * margin_penalty_map(logits, self.margin)
        return masked_mean(per_voxel, mask)


class MbLSDiceLoss(SegmentationLoss):
    """nnU-Net's own Dice+CE (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, as in
    ``nnUNetTrainer``) plus the MbLS margin penalty λ · mean relu(max_j l_j − l_k − m).

    Args:
        margin, lam: as in :class:`MbLSLoss`.
        ignore_label: label value whose voxels are excluded, or None.
        batch_dice: nnU-Net's batch Dice flag (the trainer passes its configuration's value).
        ddp: whether Dice statistics are gathered across DDP ranks (the trainer passes ``is_ddp``).

    Shapes: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    def __init__(
        self,
        margin: float = 10.0,
        lam: float = 0.1,
        ignore_label: int | None = None,
        batch_dice: bool = False,
        ddp: bool = False,
    ) -> None:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        super().__init__(ignore_label)
        self.margin = check_non_negative("margin", margin)
        self.lam = check_non_negative("lam", lam)
        self.dc_and_ce = DC_and_CE_loss(
            {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp},
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=self.ignore_label,
            dice_class=MemoryEfficientSoftDiceLoss,
        )

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"margin": self.margin, "lam": self.lam}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        prepared = self.prepare(logits, target)
        # nnU-Net's loss wants (B, 1, *spatial) with the ignore label still in place
        loss = self.dc_and_ce(prepared.logits, target if target.ndim == logits.ndim else target[:, None])
        if self.lam > 0:
            penalty = margin_penalty_map(prepared.logits, self.margin)
            loss = loss + (self.lam / logits.shape[1]) * masked_mean(penalty, prepared.mask)
        return loss
