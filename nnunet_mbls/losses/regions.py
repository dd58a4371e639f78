"""Sigmoid forms of the losses, for nnU-Net's region-based datasets (BraTS-style overlapping regions).

nnU-Net trains a region-based dataset with one sigmoid output z_r per region and a region target: (B, R,
*spatial) of 0/1, followed, when the dataset has an ignore label, by one channel that is 1 on ignored voxels
(the layout of nnU-Net's ``DC_and_BCE_loss``). Each output is a two-class problem, region r against its
complement with logits (z_r, 0), which gives each softmax loss its sigmoid form:

- cross entropy: binary cross entropy, softplus(z) − y·z;
- MbLS (our extension of the paper, whose penalty is defined for softmax outputs): the logit distance between
  the region and its complement is |z_r|, so BCE + λ · mean over voxels and regions of relu(|z_r| − m);
- label smoothing: BCE against the two-class smoothed target y·(1 − α) + α/2;
- focal: −(1 − p_t)^γ · log p_t with p_t = σ(z) where y = 1, 1 − σ(z) where y = 0.

Entropy penalty, SVLS and NACL have no sigmoid form here (see :data:`NO_REGION_FORM`). Every loss computes in
float32, never mutates its inputs, and averages over the (voxel, region) pairs of non-ignored voxels.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from .base import SegmentationLoss, check_non_negative, check_unit_interval, float32_no_autocast


class RegionLoss(SegmentationLoss):
    """Base class: ``ignore_label`` and the hyper-parameter listing as :class:`SegmentationLoss`; :meth:`prepare`
    splits nnU-Net's region target (not a label map) into targets and the voxel mask."""

    def prepare(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(logits float32 (B, R, *spatial), region targets float32 (B, R, *spatial), mask (B, 1, *spatial) of the
        scored voxels as float, or None without an ignore label).

        Raises:
            ValueError: ``target`` is not (B, R, *spatial) (plus one ignore channel with an ignore label) for
                ``logits`` (B, R, *spatial).
        """
        channels = logits.shape[1] + (self.ignore_label is not None)
        if logits.ndim < 3 or target.shape != (logits.shape[0], channels, *logits.shape[2:]):
            raise ValueError(
                f"target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: a region loss takes "
                f"logits (B, R, *spatial) and nnU-Net's region target (B, R{' + 1 ignore channel' if channels > logits.shape[1] else ''}, "
                f"*spatial) of 0/1 values")
        if self.ignore_label is None:
            return logits.float(), target.float(), None
        return logits.float(), target[:, :-1].float(), 1 - target[:, -1:].float()

    @staticmethod
    def mean(per_element: Tensor, mask: Tensor | None) -> Tensor:
        """Mean of (B, R, *spatial) values over the (voxel, region) pairs of scored voxels (0 if none)."""
        if mask is None:
            return per_element.mean()
        return (per_element * mask).sum() / (mask.sum() * per_element.shape[1]).clamp_min(1)

    def per_element(self, z: Tensor, y: Tensor) -> Tensor:
        """The loss of every (voxel, region) pair, (B, R, *spatial)."""
        raise NotImplementedError

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of ``logits`` (B, R, *spatial) against nnU-Net's region ``target``, a scalar (see :meth:`prepare`)."""
        z, y, mask = self.prepare(logits, target)
        return self.mean(self.per_element(z, y), mask)


class RegionBCELoss(RegionLoss):
    """Binary cross entropy per region (the sigmoid form of cross entropy)."""

    def per_element(self, z: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")


class RegionMbLSLoss(RegionBCELoss):
    """BCE + λ · relu(|z_r| − m) per region: MbLS with the logit distance |z_r| between a region and its complement.

    Args:
        margin: m >= 0, the tolerated distance (default 10, the paper's softmax default).
        lam: λ >= 0, the penalty's weight (default 0.1).
        ignore_label: the dataset's ignore label, or None.

    Shapes: logits (B, R, *spatial), target (B, R [+1], *spatial) -> scalar.
    """

    def __init__(self, margin: float = 10.0, lam: float = 0.1, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.margin = check_non_negative("margin", margin)
        self.lam = check_non_negative("lam", lam)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"margin": self.margin, "lam": self.lam}

    def per_element(self, z: Tensor, y: Tensor) -> Tensor:
        return super().per_element(z, y) + self.lam * F.relu(z.abs() - self.margin)


class RegionMbLSDiceLoss(RegionMbLSLoss):
    """nnU-Net's own region loss (``DC_and_BCE_loss`` with ``MemoryEfficientSoftDiceLoss``, configured as
    ``nnUNetTrainer`` configures it) + λ · mean relu(|z_r| − m).

    Args:
        margin, lam, ignore_label: as :class:`RegionMbLSLoss`.
        batch_dice, ddp: nnU-Net's Dice flags (the trainer passes its configuration's values).
    """

    def __init__(self, margin: float = 10.0, lam: float = 0.1, ignore_label: int | None = None,
                 batch_dice: bool = False, ddp: bool = False) -> None:
        from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        super().__init__(margin, lam, ignore_label)
        self.nnunet_loss = DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": ddp},
                                           use_ignore_label=self.ignore_label is not None,
                                           dice_class=MemoryEfficientSoftDiceLoss)

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        z, _, mask = self.prepare(logits, target)  # validates the shapes
        return self.nnunet_loss(z, target) + self.mean(self.lam * F.relu(z.abs() - self.margin), mask)


class RegionLabelSmoothingLoss(RegionLoss):
    """BCE against the two-class smoothed target y·(1 − α) + α/2.

    Args:
        alpha: α in [0, 1) (default 0.1).
        ignore_label: the dataset's ignore label, or None.
    """

    def __init__(self, alpha: float = 0.1, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.alpha = check_unit_interval("alpha", alpha)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    def per_element(self, z: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(z, y * (1 - self.alpha) + self.alpha / 2, reduction="none")


class RegionFocalLoss(RegionLoss):
    """−(1 − p_t)^γ · log p_t per region, p_t the sigmoid probability of the true side.

    Args:
        gamma: γ >= 0 (default 3; 0 is BCE).
        ignore_label: the dataset's ignore label, or None.
    """

    def __init__(self, gamma: float = 3.0, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.gamma = check_non_negative("gamma", gamma)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"gamma": self.gamma}

    def per_element(self, z: Tensor, y: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        return (1 - (-nll).exp()).pow(self.gamma) * nll


#: loss name (as in :data:`~nnunet_mbls.losses.registry.LOSSES`) -> its sigmoid form for region-based datasets
REGION_LOSSES: dict[str, type[RegionLoss]] = {
    "ce": RegionBCELoss,
    "focal": RegionFocalLoss,
    "ls": RegionLabelSmoothingLoss,
    "mbls": RegionMbLSLoss,
    "mbls_dice": RegionMbLSDiceLoss,
}

#: losses without a sigmoid form here, and why
NO_REGION_FORM = {
    "ecp": "its penalty is the entropy of the softmax over mutually exclusive classes",
    "svls": "it smooths a one-hot label map of mutually exclusive classes",
    "nacl": "its constraint ties the softmax to a smoothed one-hot label map of mutually exclusive classes",
}
