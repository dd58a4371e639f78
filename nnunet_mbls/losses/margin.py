"""Margin-based label smoothing (MbLS, Murugesan et al., MedIA 2023) and its Dice+CE variant."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SegmentationLoss, check_non_negative, float32_no_autocast, masked_mean
from .fused import VoxelTerms, subtract_onehot_, voxelwise_loss


def _penalty_gradient(shifted: Tensor, margin: float) -> Tensor:
    """d/dx Σ_k relu(max − x_k − m) as a (B, C, n) tensor, from ``shifted`` = x − max, whose storage it reuses.

    d/dx_k = 1[x_k = max] · n_active / n_max − 1[x_k < max − m], with n_active the number of penalised
    classes and n_max the number of classes at the maximum (ties share it equally, as with ``amax``);
    m >= 0 ensures that a penalised class is never a maximum. The indicators are written as floats by
    comparisons with ``out=`` (bool tensors and their reductions are slow on the CPU).
    """
    penalised = torch.lt(shifted, -margin, out=torch.empty_like(shifted))
    n_active = penalised.sum(dim=1, keepdim=True)
    is_max = torch.eq(shifted, 0, out=shifted)
    return is_max.mul_(n_active.div_(is_max.sum(dim=1, keepdim=True))).sub_(penalised)


class _MarginTerms(VoxelTerms):
    """Per voxel [cross entropy, when a label map t is given] + weight · Σ_k relu(max_j l_j − l_k − m)."""

    def __init__(self, margin: float, weight: float) -> None:
        self.margin, self.weight = margin, weight

    def value(self, x: Tensor, *t: Tensor) -> Tensor:
        """Per-voxel weight · Σ_k relu(max_j x_j − x_k − m), plus cross entropy when a label map is given.

        Args:
            x: (B, C, n) float32 logits of a chunk (not modified).
            *t: nothing (the penalty alone) or one (B, 1, n) int64 label map (cross entropy + penalty).

        Returns:
            (B, n) loss per voxel.
        """
        shifted = x - x.amax(dim=1, keepdim=True)  # <= 0, 0 at the maximum
        value = torch.add(shifted, self.margin).clamp_max_(0).sum(dim=1).mul_(-self.weight)  # w Σ relu(-s - m)
        if not t:
            return value
        value.sub_(shifted.gather(1, t[0]).squeeze(1))  # + cross entropy log Σ_k exp(s_k) − s_y
        return value.add_(shifted.exp_().sum(dim=1).log_())

    def gradient(self, x: Tensor, grad: Tensor, *t: Tensor) -> Tensor:
        """Gradient of :meth:`value` with respect to ``x``, times ``grad``.

        Args:
            x: (B, C, n) float32 logits of a chunk (not modified).
            grad: (B, 1, n) incoming gradient of each voxel's loss.
            *t: nothing or one (B, 1, n) int64 label map, as in :meth:`value`.

        Returns:
            (B, C, n) new tensor; tied maxima share the penalty's gradient equally.
        """
        shifted = x - x.amax(dim=1, keepdim=True)
        if not t:
            return _penalty_gradient(shifted, self.margin).mul_(grad).mul_(self.weight)
        cross_entropy = subtract_onehot_(torch.softmax(shifted, dim=1), *t)  # before shifted is overwritten
        return cross_entropy.add_(_penalty_gradient(shifted, self.margin), alpha=self.weight).mul_(grad)


def margin_penalty_map(logits: Tensor, margin: float) -> Tensor:
    """The MbLS margin penalty Σ_k relu(max_j l_j − l_k − margin) per voxel (unweighted, no cross entropy).

    Args:
        logits: (B, C, *spatial) float logits l.
        margin: tolerated logit distance m; must be >= 0 (not checked here; the gradient relies on it, see
            ``_penalty_gradient``).

    Returns:
        (B, *spatial) penalty per voxel, differentiable with respect to ``logits``.
    """
    return voxelwise_loss(logits, _MarginTerms(margin, 1.0))


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
        """``{"margin": m, "lam": λ}``, for logs and tables."""
        return {"margin": self.margin, "lam": self.lam}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """CE + λ · margin penalty of ``logits`` against ``target``, in one chunked float32 pass.

        ``logits`` (B, C, *spatial), ``target`` (B, 1, *spatial) or (B, *spatial), and the errors: as
        :meth:`SegmentationLoss.prepare`. Returns the scalar mean over the non-ignored voxels (0 if none).
        """
        logits, target, mask = self.prepare(logits, target)
        per_voxel = voxelwise_loss(logits, _MarginTerms(self.margin, self.lam / logits.shape[1]), target)
        return masked_mean(per_voxel, mask)


class MbLSDiceLoss(MbLSLoss):
    """nnU-Net's own Dice+CE plus the MbLS margin penalty λ · mean relu(max_j l_j − l_k − m).

    The Dice term is nnU-Net's: its ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, configured as
    ``nnUNetTrainer`` does (including its ignore-label masking), with the CE weight set to 0. The CE and the
    penalty are :class:`MbLSLoss`, which computes both in one chunked pass; the sum equals nnU-Net's
    Dice+CE plus the penalty without evaluating the cross entropy twice.

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

        super().__init__(margin, lam, ignore_label)
        self.nnunet_dice = DC_and_CE_loss(
            {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp},
            {},
            weight_ce=0,
            weight_dice=1,
            ignore_label=self.ignore_label,
            dice_class=MemoryEfficientSoftDiceLoss,
        )

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """nnU-Net's Dice loss plus :meth:`MbLSLoss.forward` (CE + λ · margin penalty), in float32.

        Args:
            logits: (B, C, *spatial) raw network outputs, any float dtype (fp16/bf16 under autocast).
            target: (B, 1, *spatial) or (B, *spatial) integer labels, the ignore label still in place.

        Returns:
            Scalar tensor: nnU-Net's Dice term + the mean CE and penalty over the non-ignored voxels.

        Raises:
            ValueError: the shapes do not fit (see :meth:`SegmentationLoss.prepare`).
        """
        logits = logits.float()  # once, for both terms (fp16/bf16 under autocast)
        ce_and_penalty = super().forward(logits, target)  # also validates the inputs
        # nnU-Net's loss wants (B, 1, *spatial) with the ignore label still in place
        return self.nnunet_dice(logits, target if target.ndim == logits.ndim else target[:, None]) + ce_and_penalty
