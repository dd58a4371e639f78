"""Evaluating a folder (or several) of probability files: the cases in order, merged into one summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..metrics import METRIC_KEYS, CalibrationAccumulator, aggregate
from ...defaults import BOUNDARY_WIDTH, FIT_REGION, METRIC_REGION, N_BINS, REGIONS
from .case import CaseJob
from .inputs import EvaluationError, LabelInfo, find_dataset_json, match_cases, reader_for, resolve_transpose_forward
from .workers import evaluate_cases, resolve_num_processes


def evaluate_folder(
    ref_folder: str | os.PathLike,
    pred_folder: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_json: dict | None = None,
    region: str = METRIC_REGION,
    temperature: float | None = None,
    n_bins: int = N_BINS,
    boundary_width: int = BOUNDARY_WIDTH,
    progress: bool = True,
    on_case: Callable[[str, Any], None] | None = None,
    chill: bool = False,
    plans: dict | str | os.PathLike | None = None,
    fit_region: str = FIT_REGION,
    case_reduce: Callable[[str, np.ndarray, np.ndarray, np.ndarray], Any] | None = None,
    num_processes: int | None = None,
) -> dict:
    """Evaluate every ``.npz`` in ``pred_folder`` against ``ref_folder`` (see :mod:`nnunet_mbls.calibration.evaluation`).

    Nothing is written here, so a caller that writes the result afterwards leaves no partial output behind.

    Args:
        ref_folder: folder of the reference segmentations.
        pred_folder: folder of the ``.npz`` files, or a list of folders (e.g. the validation folders of several
            folds: their cases are evaluated together, ``pooled`` over all of them); a case must not appear in
            two of them.
        dataset_json: the dataset's ``dataset.json``; default: the one next to the predictions or the
            references (:func:`~nnunet_mbls.calibration.evaluation.find_dataset_json`).
        region: the voxels the metrics are computed on, one of :data:`~nnunet_mbls.defaults.REGIONS`.
        temperature: apply normalize(p ** (1/T)) before every metric; None: the probabilities as they are.
        n_bins: equal-width confidence bins of ECE and classwise ECE.
        boundary_width: half-width in voxels of the ``boundary`` region.
        progress: show a progress bar.
        on_case: ``on_case(case, value)`` is called in this process in case order with ``case_reduce``'s value
            of each case; pass it with ``case_reduce`` or neither.
        chill: references without probabilities are skipped instead of being an error (see
            :func:`~nnunet_mbls.calibration.evaluation.match_cases`).
        plans: the model's plans (dict or plans.json), whose ``transpose_forward`` maps nnU-Net's crop box to the
            reference's axis order (see :mod:`nnunet_mbls.geometry`); default: the plans.json nnU-Net writes next
            to the predictions (``nnUNetv2_predict``'s output folder, or the trainer folder above
            ``fold_k/validation``).
        fit_region: the voxels ``case_reduce`` receives as its ``fit_mask``, one of
            :data:`~nnunet_mbls.defaults.REGIONS`.
        case_reduce: ``case_reduce(case, probs, ref, fit_mask)``, a picklable function (e.g. a
            ``functools.partial`` of a module-level one), runs where each case is evaluated, with the voxels of
            ``fit_region``; used to collect a temperature-fit subsample in the same pass: workers send back the
            reduced value, not the case's arrays. Pass it with ``on_case`` or neither.
        num_processes: cases are evaluated in that many worker processes ('spawn', as nnU-Net's pools), results
            taken in case order, so the result is identical to the serial one (each case's metrics are computed
            with one torch thread in either mode: torch's parallel sums depend on the thread count). None:
            nnU-Net's ``default_num_processes`` (``nnUNet_def_n_proc``, default 8) but at most the number of
            cases and of CPUs, and 1 (this process) when the ``.npz`` files total less than
            :data:`~nnunet_mbls.defaults.PARALLEL_MIN_BYTES`, where starting the workers would cost more than
            they save; 1: in this process.

    Returns:
        ``{"per_case": {...}, "mean": {...}, "pooled": {...}, "reliability": {...}, ...}``, as
        :func:`summarise` builds it.

    Raises:
        ValueError: only one of ``on_case`` and ``case_reduce`` is given, ``region`` or ``fit_region`` is not
            one of :data:`~nnunet_mbls.defaults.REGIONS`, or ``num_processes`` is invalid.
        EvaluationError: every problem of the files, naming the case: a case in two prediction folders, no
            ``dataset.json`` found, unmatched cases, an unreadable or inconsistent case.
    """
    if (on_case is None) != (case_reduce is None):
        raise ValueError("pass on_case and case_reduce together (on_case receives case_reduce's value), or neither")
    for name, value in (("region", region), ("fit_region", fit_region)):
        if value not in REGIONS:
            raise ValueError(f"{name}={value!r} is invalid: choose one of {REGIONS}")
    ref_folder = Path(ref_folder)
    pred_folders = [Path(pred_folder)] if isinstance(pred_folder, (str, os.PathLike)) else [Path(f) for f in pred_folder]
    cases: dict[str, tuple[Path, Path, tuple[int, ...] | None]] = {}
    for folder in pred_folders:
        transpose_forward = resolve_transpose_forward(plans, folder)
        for case, (ref_file, npz_file) in match_cases(ref_folder, folder, chill=chill or len(pred_folders) > 1).items():
            if case in cases:
                raise EvaluationError(f"case {case} has probabilities in {cases[case][1].parent} and in {folder}; "
                                      f"pass folders with distinct cases (one per fold)")
            cases[case] = (ref_file, npz_file, transpose_forward)
    if dataset_json is None:
        found = find_dataset_json(pred_folders[0], ref_folder)
        if found is None:
            raise EvaluationError(
                f"no dataset.json found next to {pred_folders[0]} or {ref_folder}; pass it with -djfile"
            )
        import json

        dataset_json = json.loads(found.read_text())
    labels = LabelInfo.from_dataset_json(dataset_json)
    reader = reader_for(dataset_json, next(iter(cases.values()))[0])
    job = CaseJob(labels, reader, region, temperature, n_bins, boundary_width, fit_region, case_reduce)
    pooled = CalibrationAccumulator(labels.num_classes, n_bins)
    per_case: dict[str, dict] = {}
    tasks = [(case, *files) for case, files in cases.items()]
    processes = resolve_num_processes(num_processes, [npz_file for _, npz_file, _ in cases.values()])
    # the generator first in zip, so that it runs to its end (the progress bar closes at N/N, the pool is released)
    for (metrics, states, extra), case in zip(evaluate_cases(job, tasks, processes, progress), cases):
        accumulator = CalibrationAccumulator(labels.num_classes, n_bins)
        accumulator.load_state_tensors([torch.from_numpy(s) for s in states])
        pooled += accumulator
        per_case[case] = metrics
        if on_case is not None:
            on_case(case, extra)
    return summarise(per_case, pooled, labels, region, temperature)


def summarise(per_case: dict, pooled: CalibrationAccumulator, labels: LabelInfo, region: str, temperature) -> dict:
    """The result of a folder evaluation from its cases' metrics.

    Args:
        per_case: case id -> the metrics of :func:`~nnunet_mbls.calibration.evaluation.evaluate_case`, in case order.
        pooled: the calibration sums of all selected voxels of all cases.
        labels: the dataset's labels (the foreground classes name the Dice / HD95 entries).
        region: the region the metrics were computed on (recorded).
        temperature: the temperature applied, or None (recorded).

    Returns:
        ``{"region", "temperature", "aggregation", "num_cases", "mean", "pooled", "reliability", "per_case"}``:
        ``mean`` is the metric per case, then the mean (and std) over cases (the paper's aggregation), with Dice
        and HD95 per class and the count of cases with an empty reference / prediction per class; ``pooled``
        holds the metrics of ``pooled``; ``reliability`` its reliability diagram as lists.
    """
    cases = list(per_case.values())
    foreground = [name for label, name in sorted(labels.names.items()) if label != 0]
    mean = aggregate(cases, METRIC_KEYS)
    for key in ("dice", "hd95"):
        per_class = aggregate([c[key] for c in cases], foreground)
        per_class.pop("n_voxels"), per_class.pop("n_cases")
        mean[key] = per_class
    for key in ("empty_reference", "empty_prediction"):
        mean[key] = {name: sum(name in c[key] for c in cases) for name in foreground}
    return {
        "region": region,
        "temperature": temperature,
        "aggregation": {
            "mean": "metric per case, then mean (and std) over cases: the paper's aggregation",
            "pooled": "all selected voxels of all cases in one accumulator",
        },
        "num_cases": len(cases),
        "mean": mean,
        "pooled": pooled.compute(),
        "reliability": {k: v.tolist() for k, v in pooled.reliability().items()},
        "per_case": per_case,
    }
