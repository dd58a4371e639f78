"""Folder evaluation from streamed statistics (``validation_statistics/``) instead of probability files.

The same result as :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder` on nnU-Net's ``.npz`` of the same
cases: calibration metrics as trained are exact (the same sums), Dice and HD95 come from the segmentation nnU-Net
exported (the argmax of those probabilities), and the metrics after T are exact or estimated as
:mod:`nnunet_mbls.calibration.after_temperature` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..after_temperature import accumulator_after, is_exact
from ..case_statistics import (CaseStatistics, StatisticsError, StatisticsSettings, case_statistics,
                               pooled_fit_threshold, read_header)
from ..metrics import CalibrationAccumulator
from ..subsample import VoxelSubsampler
from ..temperature import fit_temperature
from ...defaults import T_BOUNDS
from .case import segmentation_metrics
from .folder import summarise
from .inputs import EvaluationError, LabelInfo, reader_for


def statistics_files(folder: Path, cases: Sequence[str]) -> list[Path]:
    """``folder/<case>.npz`` of every case.

    Raises:
        EvaluationError: some are missing (named).
    """
    files = [Path(folder) / f"{case}.npz" for case in cases]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EvaluationError(f"{folder} lacks the statistics of {len(missing)} of {len(files)} cases "
                              f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    return files


def read_headers(files: Sequence[Path]) -> list[dict]:
    """The header of each statistics file (settings, fit threshold, model id) without reading its arrays.

    Raises:
        StatisticsError: a file is unreadable or of another format version, or the files' settings differ.
    """
    headers = []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as data:
                headers.append(read_header(data, f))
        except StatisticsError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StatisticsError(f"cannot read the statistics file {f} ({type(e).__name__}: {e}); run the "
                                  f"validation again (nnunet-mbls calibrate)") from e
    settings = {repr(h["settings"]) for h in headers}
    if len(settings) > 1:
        raise StatisticsError(f"the statistics files in {files[0].parent} were computed with different settings; "
                              f"run the validation again (nnunet-mbls calibrate)")
    return headers


def fit_temperature_on_statistics(files: Sequence[Path], max_voxels: int, seed: int) -> tuple[float, int]:
    """T fitted on the pooled fit samples of the cases: the ``max_voxels`` smallest keys among the rows every case
    kept (a uniform sample of all their fit-region voxels, see
    :func:`~nnunet_mbls.calibration.case_statistics.pooled_fit_threshold`).

    Returns:
        (T, the number of voxels it was fitted on).
    """
    headers = read_headers(files)
    if any(h["settings"]["seed"] != seed for h in headers):
        raise StatisticsError(f"the statistics in {files[0].parent} were drawn with seed {headers[0]['settings']['seed']}, "
                              f"not {seed}; run the validation again with this seed")
    threshold = min((h["fit_threshold"] for h in headers), default=1.0)
    subsample = VoxelSubsampler(max_voxels=max_voxels, seed=seed)
    for f in files:
        subsample.add_candidates(CaseStatistics.load(f).fit_candidates(threshold))
    log_probs, target = subsample.arrays()
    return fit_temperature(log_probs, target, t_bounds=T_BOUNDS), int(target.numel())


def segmentation_metrics_of_cases(ref_folder: Path, segmentation_folder: Path, cases: Sequence[str],
                                  dataset_json: dict, progress: bool) -> dict[str, dict]:
    """Dice and HD95 of every case, from nnU-Net's exported segmentation against the reference."""
    ending = dataset_json["file_ending"]
    reader = reader_for(dataset_json, Path(ref_folder) / f"{cases[0]}{ending}")
    labels = LabelInfo.from_dataset_json(dataset_json)
    result = {}
    for case in tqdm(cases, desc="segmentation metrics", disable=not progress):
        files = [Path(ref_folder) / f"{case}{ending}", Path(segmentation_folder) / f"{case}{ending}"]
        try:
            (ref, properties), (pred, _) = (reader.read_seg(str(f)) for f in files)
        except Exception as e:  # noqa: BLE001
            raise EvaluationError(f"case {case}: cannot read {files[0]} or {files[1]} ({type(e).__name__}: {e})") from e
        result[case] = segmentation_metrics(pred[0], ref[0], labels, properties["spacing"])
    return result


def evaluate_statistics(files: Sequence[Path], segmentation: dict[str, dict], dataset_json: dict,
                        temperature: float | None = None, progress: bool = False) -> tuple[dict, bool]:
    """The summary :func:`~nnunet_mbls.calibration.evaluation.summarise` builds, from statistics files.

    Args:
        files: one statistics file per case (case order).
        segmentation: case -> Dice/HD95 (:func:`segmentation_metrics_of_cases`).
        dataset_json: the dataset's labels.
        temperature: None: the metrics as trained (exact); else after T (exact or estimated per case).
        progress: a progress bar.

    Returns:
        (summary, whether every case's value is exact).
    """
    labels = LabelInfo.from_dataset_json(dataset_json)
    pooled = CalibrationAccumulator(labels.num_classes, read_headers(files[:1])[0]["settings"]["n_bins"])
    per_case, exact = {}, True
    for f in tqdm(files, desc="calibration metrics" if temperature is None else f"metrics after T={temperature:.3f}",
                  disable=not progress):
        statistics = CaseStatistics.load(f)
        if statistics.settings.num_classes != labels.num_classes:
            raise StatisticsError(f"{f} has {statistics.settings.num_classes} classes, dataset.json "
                                  f"{labels.num_classes}; run the validation again")
        if temperature is None:
            accumulator = statistics.accumulator()
        else:
            accumulator = accumulator_after(statistics, temperature)
            exact = exact and is_exact(statistics)
        pooled += accumulator
        per_case[statistics.case] = {**accumulator.compute(), **segmentation[statistics.case]}
    region = read_headers(files[:1])[0]["settings"]["region"]
    return summarise(per_case, pooled, labels, region, temperature), exact


def statistics_from_npz(validation: Path, ref_folder: Path, cases: Sequence[str], dataset_json: dict,
                        settings: StatisticsSettings, transpose_forward: Sequence[int], out_folder: Path,
                        progress: bool = False) -> list[Path]:
    """The statistics of cases validated with nnU-Net's ``.npz`` (a fold of nnunet-mbls <= 0.2, or stock ``--npz``),
    written into ``out_folder``, so that such a fold pools with streamed ones: log p in nnU-Net's cropped,
    transposed frame stands for the logits (softmax(log p) = p), the segmentation is its argmax.

    Returns:
        The files, in case order.
    """
    from .inputs import load_probabilities

    ending = dataset_json["file_ending"]
    reader = reader_for(dataset_json, Path(ref_folder) / f"{cases[0]}{ending}")
    order = [int(a) for a in transpose_forward]
    files = []
    for case in tqdm(cases, desc="statistics from .npz", disable=not progress):
        probs, properties = load_probabilities(case, Path(validation) / f"{case}.npz")
        ref, _ = reader.read_seg(str(Path(ref_folder) / f"{case}{ending}"))
        box = tuple(slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])
        log_probs = np.log(np.maximum(probs.transpose([0] + [a + 1 for a in order])[(slice(None), *box)], 1e-38))
        statistics = case_statistics(case, log_probs, ref[0].astype(np.int32), properties, order, settings,
                                     probs.argmax(0))
        statistics.model_id = "npz"
        files.append(statistics.save(Path(out_folder) / f"{case}.npz"))
    return files


__all__ = ["statistics_from_npz", "evaluate_statistics", "fit_temperature_on_statistics", "pooled_fit_threshold", "read_headers",
           "segmentation_metrics_of_cases", "statistics_files"]
