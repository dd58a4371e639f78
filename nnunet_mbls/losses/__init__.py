"""Calibration losses in nnU-Net's layout: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial)."""

from .base import SegmentationLoss
from .ce import CELoss
from .entropy import EntropyPenaltyLoss
from .focal import FocalLoss
from .label_smoothing import LabelSmoothingLoss
from .margin import MbLSDiceLoss, MbLSLoss, margin_penalty_map
from .registry import LOSSES, build_loss
from .spatial import NACLLoss, SVLSLoss, svls_kernel

__all__ = [
    "SegmentationLoss",
    "CELoss",
    "EntropyPenaltyLoss",
    "FocalLoss",
    "LabelSmoothingLoss",
    "MbLSLoss",
    "MbLSDiceLoss",
    "margin_penalty_map",
    "NACLLoss",
    "SVLSLoss",
    "svls_kernel",
    "LOSSES",
    "build_loss",
]
