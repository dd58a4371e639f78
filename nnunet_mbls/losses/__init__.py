"""Calibration losses in nnU-Net's layout: logits (B, C, *spatial), target (B, 1, *spatial) or (B, *spatial); their
sigmoid forms for region-based datasets in :mod:`nnunet_mbls.losses.regions`."""

from .base import SegmentationLoss
from .ce import CELoss
from .entropy import EntropyPenaltyLoss
from .focal import FocalLoss
from .label_smoothing import LabelSmoothingLoss
from .margin import MbLSDiceLoss, MbLSLoss, margin_penalty_map
from .regions import REGION_LOSSES, RegionLoss
from .registry import LOSSES, build_loss, build_region_loss
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
    "REGION_LOSSES",
    "RegionLoss",
    "build_region_loss",
]
