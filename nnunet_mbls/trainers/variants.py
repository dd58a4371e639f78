"""The trainers: one small class per loss, each naming its loss and hyper-parameters.

Names avoid nnU-Net's own trainer names, which would win the lookup (e.g. nnUNetTrainerCELoss).
"""

from __future__ import annotations

from .base import nnUNetTrainerCalibrated


class nnUNetTrainerMbLS(nnUNetTrainerCalibrated):
    """Margin-based label smoothing: CE + λ·mean relu(max_j l_j − l_k − m), m = 10, λ = 0.1 (no Dice)."""

    loss_name, loss_kwargs = "mbls", {"margin": 10.0, "lam": 0.1}


class nnUNetTrainerMbLSDice(nnUNetTrainerCalibrated):
    """nnU-Net's Dice+CE plus the MbLS margin penalty, m = 10, λ = 0.1."""

    loss_name, loss_kwargs = "mbls_dice", {"margin": 10.0, "lam": 0.1}


class nnUNetTrainerCE(nnUNetTrainerCalibrated):
    """Plain cross entropy (no Dice)."""

    loss_name, loss_kwargs = "ce", {}


class nnUNetTrainerFocal(nnUNetTrainerCalibrated):
    """Focal loss, γ = 3."""

    loss_name, loss_kwargs = "focal", {"gamma": 3.0}


class nnUNetTrainerLS(nnUNetTrainerCalibrated):
    """Label smoothing, α = 0.1."""

    loss_name, loss_kwargs = "ls", {"alpha": 0.1}


class nnUNetTrainerECP(nnUNetTrainerCalibrated):
    """Confidence (entropy) penalty, α = 0.1."""

    loss_name, loss_kwargs = "ecp", {"alpha": 0.1}


class nnUNetTrainerSVLS(nnUNetTrainerCalibrated):
    """Spatially varying label smoothing, σ = 1."""

    loss_name, loss_kwargs = "svls", {"sigma": 1.0}


class nnUNetTrainerNACL(nnUNetTrainerCalibrated):
    """Neighbor-aware calibration loss, α = 0.1, 3-voxel mean filter."""

    loss_name, loss_kwargs = "nacl", {"alpha": 0.1, "kernel_size": 3}


# margin sweep of the paper (λ = 0.1)
class nnUNetTrainerMbLS_m0(nnUNetTrainerMbLS):
    loss_kwargs = {"margin": 0.0, "lam": 0.1}


class nnUNetTrainerMbLS_m2(nnUNetTrainerMbLS):
    loss_kwargs = {"margin": 2.0, "lam": 0.1}


class nnUNetTrainerMbLS_m5(nnUNetTrainerMbLS):
    loss_kwargs = {"margin": 5.0, "lam": 0.1}


class nnUNetTrainerMbLS_m8(nnUNetTrainerMbLS):
    loss_kwargs = {"margin": 8.0, "lam": 0.1}


class nnUNetTrainerMbLS_m15(nnUNetTrainerMbLS):
    loss_kwargs = {"margin": 15.0, "lam": 0.1}


class nnUNetTrainerMbLS_m20(nnUNetTrainerMbLS):
    loss_kwargs = {"margin": 20.0, "lam": 0.1}
