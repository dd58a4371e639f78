"""Folder evaluation: calibration and segmentation metrics of nnU-Net probability files.

Input: a folder of nnU-Net ``.npz`` files (``probabilities`` (C, *spatial) float32, written by
``nnUNetv2_train --npz`` or ``nnUNetv2_predict --save_probabilities``) with their ``.pkl``
properties, and a folder of reference segmentations. Cases are streamed one at a time, so memory
holds one case plus fixed-size metric sums whatever the number of cases; with worker processes
(``num_processes``) each worker holds one case and this process merges their results in case order.

Aggregation: ``mean`` is per case, then the mean over cases (the paper's); ``pooled`` sums all
selected voxels of all cases into one accumulator. Dice uses nnU-Net's own tp/fp/fn code; HD95
(mm, image spacing) uses MONAI. A structure that is empty in the reference or in the prediction
gets NaN for that case and is counted under ``empty_reference`` / ``empty_prediction``.

Modules: :mod:`.inputs` (files: pairing, reading, checking), :mod:`.case` (one case's metrics),
:mod:`.workers` (worker processes), :mod:`.folder` (:func:`evaluate_folder`, :func:`summarise`).
"""

from __future__ import annotations

from ...defaults import PARALLEL_MIN_BYTES, REGIONS
from .case import CaseJob, evaluate_case, load_case_dependencies, segmentation_metrics
from .folder import evaluate_folder, summarise
from .inputs import (
    EvaluationError,
    LabelInfo,
    check_case,
    find_dataset_json,
    load_probabilities,
    match_cases,
    read_reference,
    reader_for,
    reference_ending,
    resolve_transpose_forward,
)
from .workers import (
    case_workers,
    evaluate_cases,
    one_torch_thread,
    resolve_num_processes,
    start_case_workers,
)

__all__ = [
    "PARALLEL_MIN_BYTES",
    "REGIONS",
    "CaseJob",
    "EvaluationError",
    "LabelInfo",
    "case_workers",
    "check_case",
    "evaluate_case",
    "evaluate_cases",
    "evaluate_folder",
    "find_dataset_json",
    "load_case_dependencies",
    "load_probabilities",
    "match_cases",
    "one_torch_thread",
    "read_reference",
    "reader_for",
    "reference_ending",
    "resolve_num_processes",
    "resolve_transpose_forward",
    "segmentation_metrics",
    "start_case_workers",
    "summarise",
]
