"""``maps`` for region-based models (one sigmoid output per region, e.g. BraTS' whole tumour / tumour core /
enhancing tumour): per-region probability maps, the summed binary entropy, and the QC scores.

A region-based ``nnUNetv2_predict --save_probabilities`` file holds one sigmoid probability per region (channels in
``dataset.json``'s label order, background and ignore left out); regions overlap, so the probabilities do not sum
to 1. Calibration is per region: σ(logit(p_r) / T_r) with the ``region_temperatures`` of a region
``calibration.json`` (or one ``-t`` for all). Scores: ``volume_ml_<region>`` (voxels with p_r > 0.5, nnU-Net's
region threshold), and ``mean_entropy_fg`` / ``mean_entropy_boundary`` of the summed binary entropy over the voxels
nnU-Net's segmentation labels, as for softmax models.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..probabilities import ProbabilityFileError
from .qc import case_scores, voxel_volume_ml

#: map kinds a region model has (confidence and mutual information are softmax notions here)
REGION_MAP_KINDS = ("probabilities", "entropy")


def region_channel_names(dataset_json: Mapping) -> list[str] | None:
    """The regions' names in output-channel order, or None for a softmax (integer-label) dataset."""
    labels = dataset_json["labels"]
    if all(isinstance(v, int) for v in labels.values()):
        return None
    return [name for name in labels if name not in ("background", "ignore")]


def region_temperatures(temperature: float | None, calibration_json: str | os.PathLike | None,
                        names: Sequence[str]) -> np.ndarray | None:
    """(R,) temperature per region: ``-t`` for every region, or ``region_temperatures`` of ``--calibration-json``."""
    from ..calibration.files import check_temperature_value
    from ..io import read_json_file

    if temperature is not None and calibration_json is not None:
        raise InputError("pass either -t T or --calibration-json F, not both")
    if temperature is not None:
        return np.full(len(names), check_temperature_value(temperature, "-t"))
    if calibration_json is None:
        return None
    record = read_json_file(calibration_json, "--calibration-json").get("region_temperatures")
    if not isinstance(record, Mapping) or sorted(record) != sorted(names):
        raise InputError(f"--calibration-json {calibration_json} has no region_temperatures for the regions {names}; "
                         f"pass the calibration.json of this region-based model (nnUNetv2_train ... --val)")
    return np.array([check_temperature_value(record[n], f"--calibration-json region {n}") for n in names])


def check_region_request(kinds: Sequence[str]) -> None:
    """Refuse map kinds a region model does not have."""
    bad = [k for k in kinds if k not in REGION_MAP_KINDS]
    if bad:
        raise ValueError(f"--maps {' '.join(bad)}: region-based models have {', '.join(REGION_MAP_KINDS)} maps only")


def check_region_probabilities(case: str, p: np.ndarray, num_regions: int, grid: tuple[int, ...], source: str) -> None:
    """Raise :class:`ProbabilityFileError` unless ``p`` holds ``num_regions`` sigmoid maps of shape ``grid``."""
    if p.ndim < 2 or p.shape[0] != num_regions or tuple(p.shape[1:]) != tuple(grid):
        raise ProbabilityFileError(f"case {case}: probabilities have shape {p.shape}; expected ({num_regions}, "
                                   f"{', '.join(map(str, grid))}) as {source} and the dataset's regions")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ProbabilityFileError(f"case {case}: probabilities are not in [0, 1]; rerun the prediction for this case")


def calibrated(p: np.ndarray, temperatures: np.ndarray | None) -> np.ndarray:
    """σ(logit(p_r) / T_r) per region (p = 0 and 1 stay)."""
    if temperatures is None:
        return p
    with np.errstate(divide="ignore"):
        z = np.log(p.astype(np.float64)) - np.log1p(-p.astype(np.float64))
    scale = temperatures.reshape((-1,) + (1,) * (p.ndim - 1))
    return (1.0 / (1.0 + np.exp(-z / scale))).astype(np.float32)


def binary_entropy_sum(p: np.ndarray) -> np.ndarray:
    """Σ_r of the binary entropy (nats) of each region's probability."""
    q = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return (-(q * np.log(q) + (1 - q) * np.log1p(-q))).sum(0).astype(np.float32)


def region_scores(segmentation: np.ndarray, p: np.ndarray, h: np.ndarray, spacing, names: Sequence[str],
                  boundary_width: int) -> dict[str, float]:
    """QC scores of a region case (module docstring)."""
    scores = case_scores(segmentation, p, spacing, {}, boundary_width, entropy_map=h)
    volume = voxel_volume_ml(spacing)
    scores.update({f"volume_ml_{n}": int(np.count_nonzero(p[r] > 0.5)) * volume for r, n in enumerate(names)})
    return scores
