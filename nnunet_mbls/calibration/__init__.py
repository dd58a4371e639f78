"""Calibration: streaming metrics, evaluation regions, temperature and vector scaling, the voxel subsample they
are fitted on, folding a map into a checkpoint, reliability diagrams, and applying T to saved probability files.

Three layers, each importing only those below it:

- this level: pure torch/numpy/scipy maths on arrays (nothing imports nnU-Net), including a case's streamed
  statistics (:mod:`.case_statistics`, :mod:`.region_voxels`) and their values after T (:mod:`.after_temperature`);
- :mod:`nnunet_mbls.calibration.evaluation`: the metrics of folders of nnU-Net probability files (``evaluate``) or
  of streamed statistics, and nnU-Net's validation export with the statistics streamed out of it;
- :mod:`nnunet_mbls.calibration.folds`: the work on trained folds (the calibration step, ensembles, vector
  scaling runs, whether a fold is calibrated), as nnU-Net's ``run/`` beside ``training/``.
"""

from nnunet_mbls.calibration.metrics import METRIC_KEYS, CalibrationAccumulator, aggregate, bin_index
from nnunet_mbls.calibration.regions import REGIONS, region_mask
from nnunet_mbls.calibration.reliability import plot_reliability
from nnunet_mbls.calibration.checkpoint import fold_temperature_into_checkpoint
from nnunet_mbls.calibration.subsample import VoxelSubsampler
from nnunet_mbls.calibration.temperature import apply_temperature, fit_temperature

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
