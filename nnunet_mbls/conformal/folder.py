"""``nnunet-mbls conformal -ref GT -pred PRED``: the rules fitted on a ``nnUNetv2_predict --save_probabilities``
folder and the reference segmentations of its cases (the deployed model's actual output: the exact route)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..calibration.conformal.curves import case_curves
from ..calibration.evaluation.inputs import (EvaluationError, LabelInfo, check_case, find_dataset_json,
                                             load_probabilities, match_cases, read_reference, reader_for)
from ..calibration.files import temperature_from_options
from ..calibration.temperature import apply_temperature
from ..inference.qc import DEFAULT_BOUNDARY_WIDTH, case_scores, voxel_volume_ml
from ..io import read_json_file, refuse_outputs_over_inputs
from .record import AcceptanceSettings, fit_and_write, labels_to_calibrate


def conformal_from_folders(ref_folder: str | os.PathLike, pred_folder: str | os.PathLike,
                           output_file: str | os.PathLike, risks: Sequence[str], alpha: float,
                           labels: Sequence[str] | None = None, acceptance: AcceptanceSettings | None = None,
                           temperature: float | None = None, calibration_json: str | os.PathLike | None = None,
                           chill: bool = False, progress: bool = True) -> dict:
    """Fit ``conformal.json`` on the cases of ``pred_folder``.

    Args:
        ref_folder: ``-ref``, the reference segmentations.
        pred_folder: ``-pred``, ``<case>.npz`` + ``<case>.pkl`` of ``nnUNetv2_predict --save_probabilities`` (and its
            ``dataset.json``).
        output_file: ``-o``, the ``conformal.json`` to write (atomically; never inside the input folders).
        risks: any of ``fnr``, ``fdr``, ``volume``.
        alpha: the risk level α in (0, 1).
        labels: names of the labels to calibrate (default: every foreground label).
        acceptance: the acceptance rule to fit, or None.
        temperature: apply normalize(p ** (1/T)) first; pass at most one of it and ``calibration_json``.
        calibration_json: take T from this ``calibration.json``.
        chill: references without probabilities are skipped (as ``evaluate --chill``).
        progress: show a progress bar.

    Returns:
        The record written.
    """
    ref_folder, pred_folder, output_file = Path(ref_folder), Path(pred_folder), Path(output_file)
    refuse_outputs_over_inputs({"-o": output_file}, {"--calibration-json": calibration_json or []},
                               {"-ref": ref_folder, "-pred": pred_folder})
    temperature = temperature_from_options(temperature, calibration_json)
    pairs = match_cases(ref_folder, pred_folder, chill)
    dataset_json_file = find_dataset_json(pred_folder, ref_folder)
    if dataset_json_file is None:
        raise EvaluationError(f"no dataset.json next to {pred_folder} or {ref_folder}; nnUNetv2_predict writes one into "
                              f"its output folder")
    dataset_json = read_json_file(dataset_json_file, "dataset.json")
    label_info = LabelInfo.from_dataset_json(dataset_json)
    names = labels_to_calibrate(dataset_json["labels"], labels)
    foreground = {int(v): k for k, v in dataset_json["labels"].items() if k != "ignore" and int(v) != 0}
    reader = reader_for(dataset_json, next(iter(pairs.values()))[0])
    curves = []
    for case, (ref_file, npz_file) in tqdm(pairs.items(), desc="conformal", unit="case", disable=not progress):
        probabilities, properties = load_probabilities(case, npz_file)
        reference, ref_properties = read_reference(case, reader, ref_file)
        check_case(case, probabilities, reference, label_info)
        if temperature is not None:
            probabilities = apply_temperature(probabilities, temperature)
        spacing = properties.get("spacing", ref_properties["spacing"])
        scores = case_scores(probabilities.argmax(0), probabilities, spacing, foreground, DEFAULT_BOUNDARY_WIDTH)
        curves.append(case_curves(case, probabilities, reference, sorted(foreground), voxel_volume_ml(spacing),
                                  label_info.ignore_label, scores))
    source = {"route": "folders", "references": str(ref_folder.resolve()), "predictions": str(pred_folder.resolve()),
              "temperature": temperature, "calibration_json": str(calibration_json) if calibration_json else None,
              "probabilities": "as predicted" if temperature is None else f"after temperature T = {temperature:g}"}
    return fit_and_write(curves, names, risks, alpha, acceptance, label_info.num_classes, source, output_file)
