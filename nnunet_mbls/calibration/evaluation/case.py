"""One case's metrics: calibration sums over a voxel region, Dice and HD95 per class.

Dice uses nnU-Net's own tp/fp/fn code; HD95 (mm, image spacing) uses MONAI. A structure that is empty in the
reference or in the prediction gets NaN for that case and is listed under ``empty_reference`` /
``empty_prediction``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..metrics import CalibrationAccumulator
from ..regions import region_mask
from ..temperature import apply_temperature
from ...geometry import GeometryError, crop_box
from .inputs import EvaluationError, LabelInfo, check_case, load_probabilities, read_reference


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, labels: LabelInfo, spacing) -> dict:
    """Per-class Dice (nnU-Net's tp/fp/fn) and HD95 in mm (MONAI) of one case.

    Args:
        pred: (*spatial) predicted labels (the argmax of the probabilities).
        ref: (*spatial) reference labels; voxels of the ignore label count for neither side.
        labels: the dataset's labels; the background (label 0) is skipped.
        spacing: voxel spacing of the reference image, one value per spatial axis (HD95 is in its unit).

    Returns:
        ``{"dice": {name: float}, "hd95": {name: float}, "empty_reference": [names],
        "empty_prediction": [names]}``. Dice is NaN when the class is absent from both sides, HD95 when it is
        absent from either.
    """
    from monai.metrics import compute_hausdorff_distance
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    ignore = ref == labels.ignore_label if labels.ignore_label is not None else None
    dice, hd95, empty_ref, empty_pred = {}, {}, [], []
    for label, name in labels.names.items():
        if label == 0:
            continue
        mask_ref, mask_pred = ref == label, pred == label
        if ignore is not None:
            mask_pred = mask_pred & ~ignore
        tp, fp, fn, _ = compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore)
        dice[name] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else float("nan")
        if not mask_ref.any():
            empty_ref.append(name)
        if not mask_pred.any():
            empty_pred.append(name)
        if mask_ref.any() and mask_pred.any():
            with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                value = compute_hausdorff_distance(
                    torch.from_numpy(mask_pred)[None, None], torch.from_numpy(mask_ref)[None, None],
                    include_background=True, percentile=95, spacing=[float(s) for s in spacing],
                )
            hd95[name] = float(value.item())
        else:
            hd95[name] = float("nan")
    return {"dice": dice, "hd95": hd95, "empty_reference": empty_ref, "empty_prediction": empty_pred}


@dataclass
class CaseJob:
    """What every case of one :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder` call is evaluated with (sent to the
    workers with each case); ``case_reduce``: see :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder`."""

    labels: LabelInfo
    reader: Any
    region: str
    temperature: float | None
    n_bins: int
    boundary_width: int
    fit_region: str
    case_reduce: Callable | None


def evaluate_case(job: CaseJob, case: str, ref_file: Path, npz_file: Path, transpose_forward) -> tuple[dict, list, Any]:
    """Evaluate one case.

    Args:
        job: the settings of the folder evaluation.
        case: the case id.
        ref_file: the case's reference segmentation.
        npz_file: the case's probabilities (with its ``.pkl``).
        transpose_forward: the plans' ``transpose_forward`` (None: unknown, see :func:`nnunet_mbls.geometry.crop_box`).

    Returns:
        (metrics, calibration accumulator states as numpy arrays, ``job.case_reduce``'s value or None).
        ``case_reduce`` gets ``(case, probs, ref, fit_mask)`` with the voxels of ``job.fit_region``.

    Raises:
        EvaluationError: a file cannot be read, the probabilities do not fit the reference or the labels, or
            the crop box does not fit the reference.
    """
    probs, properties = load_probabilities(case, npz_file)
    ref, seg_properties = read_reference(case, job.reader, ref_file)
    labels = job.labels
    check_case(case, probs, ref, labels)
    if job.temperature is not None:
        probs = apply_temperature(probs, job.temperature)
    try:
        box = crop_box(properties, transpose_forward, ref.shape)
    except GeometryError as e:
        raise EvaluationError(f"case {case}: {e}") from e
    mask = region_mask(ref, job.region, labels.ignore_label, box, job.boundary_width)
    accumulator = CalibrationAccumulator(labels.num_classes, job.n_bins)
    target = np.where(mask, ref, 0)
    accumulator.update(torch.from_numpy(probs), torch.from_numpy(target), torch.from_numpy(mask))
    pred = probs.argmax(0)
    metrics = {
        **accumulator.compute(),
        **segmentation_metrics(pred, ref, labels, seg_properties["spacing"]),
    }
    extra = None
    if job.case_reduce is not None:
        fit_mask = region_mask(ref, job.fit_region, labels.ignore_label, box, job.boundary_width)
        extra = job.case_reduce(case, probs, ref, fit_mask)
    return metrics, [s.numpy() for s in accumulator.state_tensors()], extra


def load_case_dependencies() -> None:
    """Import what every case needs (MONAI, nnU-Net's metrics) once, before the first case is timed."""
    import monai.metrics  # noqa: F401
    import nnunetv2.evaluation.evaluate_predictions  # noqa: F401
