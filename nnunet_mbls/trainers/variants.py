"""The trainers: one small class per loss, each naming its loss and hyper-parameters.

Names avoid nnU-Net's own trainer names, which would win the lookup (e.g. nnUNetTrainerCELoss). The loss and
its hyper-parameters of each class come from :mod:`nnunet_mbls.trainers.catalog` (what ``nnunet-mbls trainers``
lists without importing nnU-Net).
"""

from __future__ import annotations

from .base import nnUNetTrainerCalibrated
from .catalog import loss_of


class nnUNetTrainerMbLS(nnUNetTrainerCalibrated):
    """Margin-based label smoothing: CE + λ·mean relu(max_j l_j − l_k − m), m = 10, λ = 0.1 (no Dice)."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS")


class nnUNetTrainerMbLSDice(nnUNetTrainerCalibrated):
    """nnU-Net's Dice+CE plus the MbLS margin penalty, m = 10, λ = 0.1."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLSDice")


class nnUNetTrainerCE(nnUNetTrainerCalibrated):
    """Plain cross entropy (no Dice)."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerCE")


class nnUNetTrainerFocal(nnUNetTrainerCalibrated):
    """Focal loss, γ = 3."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerFocal")


class nnUNetTrainerLS(nnUNetTrainerCalibrated):
    """Label smoothing, α = 0.1."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerLS")


class nnUNetTrainerECP(nnUNetTrainerCalibrated):
    """Confidence (entropy) penalty, α = 0.1."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerECP")


class nnUNetTrainerSVLS(nnUNetTrainerCalibrated):
    """Spatially varying label smoothing, σ = 1."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerSVLS")


class nnUNetTrainerNACL(nnUNetTrainerCalibrated):
    """Neighbor-aware calibration loss, α = 0.1, 3-voxel mean filter."""

    loss_name, loss_kwargs = loss_of("nnUNetTrainerNACL")


# margin sweep of the paper (λ = 0.1)
class nnUNetTrainerMbLS_m0(nnUNetTrainerMbLS):
    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS_m0")


class nnUNetTrainerMbLS_m2(nnUNetTrainerMbLS):
    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS_m2")


class nnUNetTrainerMbLS_m5(nnUNetTrainerMbLS):
    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS_m5")


class nnUNetTrainerMbLS_m8(nnUNetTrainerMbLS):
    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS_m8")


class nnUNetTrainerMbLS_m15(nnUNetTrainerMbLS):
    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS_m15")


class nnUNetTrainerMbLS_m20(nnUNetTrainerMbLS):
    loss_name, loss_kwargs = loss_of("nnUNetTrainerMbLS_m20")
