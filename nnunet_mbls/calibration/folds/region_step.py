"""The calibration step of a region-based (sigmoid) fold: one temperature per region, σ(z_r / T_r), fitted on the
streamed region statistics of its validation cases (:mod:`nnunet_mbls.calibration.region_statistics`) and folded
into the head (scale 1/T_r per output channel; the 0.5-threshold segmentation is unchanged).

Metrics per region, binary ECE (15 bins of σ(z_r)) and mean binary cross entropy on the voxels inside nnU-Net's
crop box (ignore label excluded): before T exact (summed while each case was in memory), after T estimated on the
fit's uniform voxel sample; the same estimate of the before-T ECE, next to its exact value, shows the estimate's
error, and both go into ``calibration.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ... import __version__
from ...defaults import MAX_VOXELS, SEED, T_BOUNDS
from ...io import atomic_write_json
from ...layout import CHECKPOINT_FINAL, FoldFolder
from ..evaluation.statistics import statistics_files
from ..region_statistics import N_BINS, RegionCaseStatistics, binary_bins, binary_metrics
from ..reliability import plot_reliability
from ..temperature import fit_temperature
from .step import CalibrationStepError, validation_cases_of_fold, write_calibrated_checkpoint

METHOD = "per-region temperature: sigmoid(z_r / T_r)"


def region_names(dataset_json: dict) -> list[str]:
    """The regions' names in output-channel order (``dataset.json``'s labels without background and ignore)."""
    return [name for name in dataset_json["labels"] if name not in ("background", "ignore")]


def pooled_sample(statistics: list[RegionCaseStatistics], max_voxels: int) -> np.ndarray:
    """Per case, the mask of its kept voxels that belong to the pooled ``max_voxels`` smallest keys — a uniform
    sample of all cases' voxels: the threshold never exceeds the largest key a case with more voxels than it kept
    holds (beyond it, that case's voxels are unknown)."""
    keys = np.concatenate([s.keys for s in statistics])
    threshold = np.partition(keys, max_voxels - 1)[max_voxels - 1] if keys.size > max_voxels else np.inf
    for s in statistics:
        if s.bins[0, 0].sum() > s.keys.size:  # the case kept only part of its voxels
            threshold = min(threshold, s.keys.max())
    return [s.keys <= threshold for s in statistics]


def curve(bins: np.ndarray) -> dict:
    """A reliability curve (:func:`~nnunet_mbls.calibration.reliability.plot_reliability`) from (3, N_BINS) sums."""
    edges = np.linspace(0, 1, N_BINS + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": bins[1] / bins[0],
                "accuracy": bins[2] / bins[0], "count": bins[0]}


def calibrate_region_fold(folder: Path, expected_cases: list[str] | None = None, model_id: str | None = None,
                          checkpoint: str | None = CHECKPOINT_FINAL, log: Callable[..., None] = print,
                          max_voxels: int = MAX_VOXELS, seed: int = SEED) -> dict:
    """Fit T_r per region on the fold's streamed region statistics, write ``calibration.json``,
    ``calibration/reliability.png`` and the calibrated checkpoint (see
    :func:`~nnunet_mbls.calibration.folds.step.write_calibrated_checkpoint`).

    Raises:
        CalibrationStepError: a validation case's statistics are missing or were computed by other weights.
    """
    fold = FoldFolder.at(folder)
    cases = sorted(expected_cases) if expected_cases is not None else validation_cases_of_fold(folder)
    if cases is None:
        cases = sorted(p.name[: -len(".npz")] for p in fold.validation_statistics.glob("*.npz"))
    try:
        statistics = [RegionCaseStatistics.load(f) for f in statistics_files(fold.validation_statistics, cases)]
    except Exception as error:
        raise CalibrationStepError(f"{fold.validation_statistics}: {error}; validate again with "
                                   f"{fold.train_command('--val')}") from error
    if not statistics or (model_id is not None and {s.model_id for s in statistics} != {model_id}):
        raise CalibrationStepError(f"{fold.validation_statistics} holds no statistics of the validated weights; "
                                   f"validate again with {fold.train_command('--val')}")
    names = region_names(json.loads((fold.trainer_folder / "dataset.json").read_text()))
    kept = pooled_sample(statistics, max_voxels)
    temperatures, before, after, estimate, curves = [], {}, {}, {}, {}
    for r, name in enumerate(names):
        z = torch.from_numpy(np.concatenate([s.logits[r][k] for s, k in zip(statistics, kept)]))
        y = torch.from_numpy(np.concatenate([s.targets[r][k] for s, k in zip(statistics, kept)]))
        # sigmoid(z / T) is softmax([z, 0] / T): the softmax fit on the two-class logits
        T = fit_temperature(torch.stack([z, torch.zeros_like(z)], 1), (~y).long())
        temperatures.append(T)
        exact = sum(s.bins[r] for s in statistics), float(sum(s.nll[r] for s in statistics))
        before[name] = binary_metrics(*exact)
        estimate[name] = binary_metrics(*binary_bins(z, y))["ece"]
        after_bins, after_nll = binary_bins(z / T, y)
        after[name] = binary_metrics(after_bins, after_nll)
        curves[f"{name} before (ECE {before[name]['ece']:.4f})"] = curve(exact[0])
        curves[f"{name} after T={T:.3f} (ECE {after[name]['ece']:.4f}, estimated)"] = curve(after_bins)
    plot_reliability(curves, fold.calibration_details / "reliability.png",
                     title=f"{folder.parent.name} {folder.name}: regions, crop box voxels, pooled")
    calibrated = write_calibrated_checkpoint(folder, None, log, checkpoint, scale=[1 / T for T in temperatures])
    sample_size = int(sum(k.sum() for k in kept))
    record = {
        "method": METHOD,
        "region_temperatures": dict(zip(names, temperatures)),
        "temperature_bounds": list(T_BOUNDS),
        "fit": {"objective": "mean binary cross entropy of sigmoid(z_r / T_r), per region",
                "voxels": "uniform subsample of the voxels inside nnU-Net's crop box of every validation case of this "
                          "fold, ignore label excluded (the same voxels for every region)",
                "subsample_size": sample_size, "max_voxels": max_voxels, "seed": seed},
        "metric_region": "voxels inside nnU-Net's crop box, ignore label excluded (binary ECE of each region, 15 bins)",
        "num_cases": len(statistics),
        "before": {"regions": before},
        "after": {"regions": after},
        "metrics_after_temperature": {
            "method": f"estimated on the fit's uniform sample ({sample_size} voxels); before T exact",
            "before_ece_estimate_error": {name: abs(estimate[name] - before[name]["ece"]) for name in names}},
        **calibrated,
        "checkpoint_calibration": "this fold's per-region temperatures" if calibrated["calibrated_checkpoint"] else None,
        "statistics": {"source": "region statistics streamed out of nnU-Net's validation export "
                                 "(validation_statistics/), no probability file"},
        "nnunet_mbls_version": __version__,
    }
    atomic_write_json(fold.calibration_record, record)
    log("nnunet-mbls calibration (regions): " + "; ".join(
        f"{name}: T = {T:.4f}, ECE {before[name]['ece']:.4f} -> {after[name]['ece']:.4f}"
        for name, T in zip(names, temperatures)))
    return record
