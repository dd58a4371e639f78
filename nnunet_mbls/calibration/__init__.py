"""Calibration: streaming metrics, evaluation regions, temperature scaling, reliability diagrams.

Pure torch/numpy/scipy; nothing here imports nnU-Net.
"""

from nnunet_mbls.calibration.metrics import METRIC_KEYS, CalibrationAccumulator, aggregate, bin_index
from nnunet_mbls.calibration.regions import REGIONS, region_mask
from nnunet_mbls.calibration.reliability import plot_reliability
from nnunet_mbls.calibration.temperature import (
    VoxelSubsampler,
    apply_temperature,
    fit_temperature,
    fold_temperature_into_checkpoint,
)

__all__ = [
    "METRIC_KEYS",
    "REGIONS",
    "CalibrationAccumulator",
    "VoxelSubsampler",
    "aggregate",
    "apply_temperature",
    "bin_index",
    "fit_temperature",
    "fold_temperature_into_checkpoint",
    "plot_reliability",
    "region_mask",
]
