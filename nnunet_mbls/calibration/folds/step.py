"""The calibration step of one trained fold (what our trainers run after nnU-Net's validation): metrics before
and after temperature scaling, the fitted temperature, and ``checkpoint_final_calibrated.pth`` with T folded into
the head.

Outputs in the fold folder (never inside ``validation/``, whose files nnU-Net's evaluation and ensembling glob):

- ``calibration.json``: T, the fit's voxel subsample, mean/pooled metrics before and after, which map the
  calibrated checkpoint holds (``checkpoint_temperature``, ``checkpoint_calibration``) and the checkpoint it
  derives from (``source_checkpoint``: name and SHA-256);
- ``calibration/``: full per-case evaluations (``evaluation_before.json``, ``evaluation_after.json``)
  and ``reliability.png`` (before vs after);
- ``checkpoint_final_calibrated.pth``: a copy of ``checkpoint_final.pth`` whose segmentation head
  outputs logits / T. ``checkpoint_final.pth`` is never modified. After ``nnUNetv2_train ... --val_best``
  nnU-Net validated ``checkpoint_best.pth``, so T goes into ``checkpoint_best_calibrated.pth`` instead.

The temperature is fitted on a bounded, seeded, uniform subsample (``max_voxels``, default 10^6) of the
voxels of ``fit_region`` (inside nnU-Net's crop box, or the foreground) of every case (ignore label
excluded), so the fit costs the same on a 2D toy fold and on a 3D CT fold.
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from ... import __version__
from ...defaults import FIT_REGION, FIT_REGIONS, MAX_VOXELS, METRIC_REGION, SEED, T_BOUNDS
from ...errors import NnunetMblsError
from ..after_temperature import ESTIMATOR, MEASURED_ERROR
from ..evaluation import case_workers, evaluate_folder
from ..case_statistics import StatisticsSettings
from ..evaluation import LabelInfo, resolve_transpose_forward
from ..evaluation.statistics import (evaluate_statistics, fit_temperature_on_statistics, read_headers,
                                     segmentation_metrics_of_cases, statistics_files, statistics_from_npz)
from ...io import atomic_write_json, partial_folder
from ...layout import CHECKPOINT_FINAL, FoldFolder, calibrated_name, fold_name
from ...locks import fold_lock
from ..checkpoint import fold_logit_affine_into_checkpoint, fold_temperature_into_checkpoint
from ..subsample import VoxelSubsampler, case_candidates
from ..temperature import fit_temperature
from .records import TemperatureFit, fit_record, log_fit, write_fit_details


class CalibrationStepError(NnunetMblsError, RuntimeError):
    """The calibration step cannot run; the message says what to run first."""


def plans_of(trainer_folder: Path) -> Path | None:
    """The plans.json nnU-Net writes into a trainer folder (None when absent: the crop box's axis order is then
    inferred from the shapes, see :func:`nnunet_mbls.geometry.crop_box`)."""
    plans = Path(trainer_folder) / "plans.json"
    return plans if plans.is_file() else None


def gt_folder_for(output_folder: Path) -> Path:
    """nnUNet_preprocessed/<dataset>/gt_segmentations for a fold folder <results>/<dataset>/<trainer>/fold_k."""
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed:
        raise CalibrationStepError("nnUNet_preprocessed is not set; export it as for nnUNetv2_train")
    gt = Path(nnUNet_preprocessed) / output_folder.resolve().parent.parent.name / "gt_segmentations"
    if not gt.is_dir():
        raise CalibrationStepError(f"reference segmentations {gt} are missing; run nnUNetv2_plan_and_preprocess first")
    return gt


def validation_cases_of_fold(folder: Path) -> list[str] | None:
    """The fold's validation cases from nnUNet_preprocessed/<dataset>/splits_final.json (None if unknown)."""
    from nnunetv2.paths import nnUNet_preprocessed

    fold = fold_name(folder)
    if fold == "all":
        return None  # validated on every training case: whatever gt_segmentations holds
    splits_file = Path(nnUNet_preprocessed) / folder.resolve().parent.parent.name / "splits_final.json"
    if not fold.isdigit() or not splits_file.is_file():
        return None
    splits = json.loads(splits_file.read_text())
    # nnU-Net draws a random split (not saved) for a fold beyond the file's folds
    return sorted(splits[int(fold)]["val"]) if int(fold) < len(splits) else None


@case_workers()  # the two passes share their worker processes
def fit_temperature_on(gt: Path, prediction_folders: list[Path], dataset_json: dict, plans: Path | dict | None,
                       region: str, fit_region: str, max_voxels: int, seed: int, progress: bool,
                       chill: bool = True, num_processes: int | None = None) -> TemperatureFit:
    """Fit T on a seeded uniform subsample of the ``fit_region`` voxels of every case of the folders, then
    evaluate every case before and after (``region`` voxels). One pass for the metrics and the subsample.

    The subsample: every voxel gets a uniform key from a generator seeded by (``seed``, its case's name) and the
    ``max_voxels`` smallest keys of all cases are kept (:func:`~nnunet_mbls.calibration.subsample.case_candidates`),
    so it is the same whatever ``num_processes`` (see :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder`) and the
    order of the cases."""
    if fit_region not in FIT_REGIONS:
        raise ValueError(f"fit_region={fit_region!r} is invalid: choose one of {', '.join(FIT_REGIONS)}")
    subsample = VoxelSubsampler(max_voxels=max_voxels, seed=seed)
    before = evaluate_folder(
        gt, prediction_folders, dataset_json, region=region, progress=progress, chill=chill, plans=plans,
        fit_region=fit_region, case_reduce=functools.partial(case_candidates, max_voxels=max_voxels, seed=seed),
        on_case=lambda case, candidates: subsample.add_candidates(candidates), num_processes=num_processes,
    )
    log_probs, target = subsample.arrays()
    temperature = fit_temperature(log_probs, target, t_bounds=T_BOUNDS)
    after = evaluate_folder(gt, prediction_folders, dataset_json, region=region, temperature=temperature,
                            progress=progress, chill=chill, plans=plans, num_processes=num_processes)
    return TemperatureFit(temperature, int(target.numel()), before, after)


def fit_temperature_on_streamed(gt: Path, statistics_folders: list[Path], segmentation_folders: list[Path],
                                cases: list[list[str]], dataset_json: dict, max_voxels: int, seed: int,
                                progress: bool, segmentation: dict | None = None) -> tuple[TemperatureFit, dict]:
    """:func:`fit_temperature_on` from streamed statistics (one folder per fold, with its cases) and the segmentations
    nnU-Net exported beside them, without probability files. ``segmentation``: case -> Dice/HD95 when known
    already (a fold's earlier evaluation: T does not change the argmax), instead of computing them again.

    Returns:
        (the fit, what calibration.json records about the statistics: their source and whether the metrics
        after T are exact or estimated).
    """
    files = _statistics_files(statistics_folders, cases)
    temperature, size = fit_temperature_on_statistics(files, max_voxels, seed)
    if segmentation is None:
        segmentation = _segmentation_metrics(gt, segmentation_folders, cases, dataset_json, progress)
    before, _ = evaluate_statistics(files, segmentation, dataset_json, None, progress)
    after, exact = evaluate_statistics(files, segmentation, dataset_json, temperature, progress)
    record = {
        "source": "statistics streamed out of nnU-Net's validation export (validation_statistics/), no probability file",
        "metrics_after_temperature": "exact" if exact else "estimated",
        "after_temperature_method": ESTIMATOR,
        **({} if exact else {"after_temperature_measured_error": MEASURED_ERROR}),
    }
    return TemperatureFit(temperature, size, before, after), record


def evaluate_streamed(gt: Path, statistics_folders: list[Path], segmentation_folders: list[Path], cases: list[list[str]],
                      dataset_json: dict, progress: bool, temperature: float | None = None) -> tuple[dict, bool]:
    """:func:`~nnunet_mbls.calibration.evaluation.evaluate_folder`'s summary from streamed statistics (one folder per
    fold, with its cases) and the segmentations nnU-Net exported beside them; (summary, exact after T)."""
    segmentation = _segmentation_metrics(gt, segmentation_folders, cases, dataset_json, progress)
    return evaluate_statistics(_statistics_files(statistics_folders, cases), segmentation, dataset_json, temperature,
                               progress)


def _statistics_files(statistics_folders: list[Path], cases: list[list[str]]) -> list[Path]:
    return [f for folder, fold_cases in zip(statistics_folders, cases) for f in statistics_files(folder, fold_cases)]


def _segmentation_metrics(gt: Path, segmentation_folders: list[Path], cases: list[list[str]], dataset_json: dict,
                          progress: bool) -> dict:
    """Case -> Dice/HD95 of the segmentations of every fold (one folder per fold, with its cases)."""
    result = {}
    for folder, fold_cases in zip(segmentation_folders, cases):
        result.update(segmentation_metrics_of_cases(gt, folder, fold_cases, dataset_json, progress))
    return result


def streamed_cases(folder: Path, expected_cases: list[str] | None, region: str, fit_region: str,
                   model_id: str | None = None, seed: int | None = None) -> list[str] | None:
    """The fold's validation cases when ``validation_statistics/`` holds statistics of all of them, computed with
    ``region``, ``fit_region`` (and ``seed``, and by the weights ``model_id``, when given); else None."""
    fold = FoldFolder.at(folder)
    have = sorted(p.name[: -len(".npz")] for p in fold.validation_statistics.glob("*.npz"))
    expected = sorted(expected_cases) if expected_cases is not None else validation_cases_of_fold(folder)
    cases = expected if expected is not None else have
    if not cases or not set(cases) <= set(have):
        return None
    try:
        headers = read_headers(statistics_files(fold.validation_statistics, cases))
    except NnunetMblsError:
        return None
    settings = headers[0]["settings"]
    if (settings["region"], settings["fit_region"]) != (region, fit_region) or seed not in (None, settings["seed"]):
        return None
    if len({h["model_id"] for h in headers}) != 1 or (model_id is not None and headers[0]["model_id"] != model_id):
        return None
    return cases


NPZ_SOURCE = {"source": "nnU-Net's .npz probabilities in validation/", "metrics_after_temperature": "exact"}


def fit_on_folds(folders: list[Path], expected_cases: list[list[str] | None], region: str, fit_region: str,
                 max_voxels: int, seed: int, progress: bool, num_processes: int | None = None,
                 model_id: str | None = None, segmentation: dict | None = None) -> tuple[TemperatureFit, dict]:
    """One T on the validation cases of ``folders`` (pooled), from their streamed statistics when every fold has
    them for all its cases (``expected_cases``: per fold, None = from splits_final.json), else from their ``.npz``.

    Returns:
        (the fit, calibration.json's ``statistics``: the source, and whether the metrics after T are exact).

    Raises:
        CalibrationStepError: neither statistics nor ``.npz`` of every validation case (the message names the command).
    """
    folds = [FoldFolder.at(f) for f in folders]
    dataset_json = json.loads((folds[0].trainer_folder / "dataset.json").read_text())
    gt = gt_folder_for(folds[0].path)
    streamed = [streamed_cases(f, cases, region, fit_region, model_id, seed) for f, cases in zip(folders, expected_cases)]
    if all(cases is None for cases in streamed):  # the .npz route (every fold has its .npz: checked here)
        for folder, cases in zip(folders, expected_cases):
            check_validation_complete(folder, cases)
        # gt_segmentations holds every training case, validation/ only the fold's: chill (completeness checked above)
        fit = fit_temperature_on(gt, [f.validation for f in folds], dataset_json, plans_of(folds[0].trainer_folder),
                                 region, fit_region, max_voxels, seed, progress, num_processes=num_processes)
        return fit, NPZ_SOURCE
    with statistics_of_folds(folds, streamed, expected_cases, dataset_json, region, fit_region, seed,
                             progress) as (statistics_folders, cases):
        return fit_temperature_on_streamed(gt, statistics_folders, [f.validation for f in folds], cases, dataset_json,
                                           max_voxels, seed, progress, segmentation)


@contextmanager
def statistics_of_folds(folds: list[FoldFolder], streamed: list[list[str] | None], expected_cases: list[list[str] | None],
                        dataset_json: dict, region: str, fit_region: str, seed: int, progress: bool):
    """(statistics folder, cases) of every fold: its ``validation_statistics/`` where :func:`streamed_cases` found
    them (``streamed``), else statistics made from its ``.npz`` (:func:`~nnunet_mbls.calibration.evaluation.statistics.statistics_from_npz`)
    in a temporary folder inside the trainer folder, removed when the block ends (nothing is written into the fold)."""
    with partial_folder(folds[0].trainer_folder) as tmp:
        statistics_folders, cases = [], []
        for fold, fold_streamed, expected in zip(folds, streamed, expected_cases):
            if fold_streamed is not None:
                statistics_folders.append(fold.validation_statistics)
                cases.append(fold_streamed)
                continue
            check_validation_complete(fold.path, expected)
            fold_cases = sorted(expected) if expected is not None else (validation_cases_of_fold(fold.path) or sorted(
                p.name[: -len(".npz")] for p in fold.validation.glob("*.npz")))
            labels = LabelInfo.from_dataset_json(dataset_json)
            settings = StatisticsSettings(labels.num_classes, labels.ignore_label, region, fit_region, seed=seed)
            out = Path(tmp) / fold.path.name
            out.mkdir()
            statistics_from_npz(fold.validation, gt_folder_for(fold.path), fold_cases, dataset_json, settings,
                                resolve_transpose_forward(plans_of(fold.trainer_folder), fold.validation), out, progress)
            statistics_folders.append(out)
            cases.append(fold_cases)
        yield statistics_folders, cases


def check_validation_complete(folder: Path, expected_cases: list[str] | None = None) -> None:
    """CalibrationStepError naming the command unless ``validation/`` holds every validation case's ``.npz`` (the
    route of folds without streamed statistics)."""
    fold = FoldFolder.at(folder)
    validation = fold.validation
    if not validation.is_dir() or not any(validation.glob("*.npz")):
        raise CalibrationStepError(
            f"{folder} has neither the streamed statistics of its validation cases ({fold.validation_statistics.name}/) "
            f"nor their .npz probabilities; run {fold.calibrate_command()} (it runs nnU-Net's validation, streaming "
            f"the statistics), or {fold.train_command('--val --npz')} for nnU-Net's .npz"
        )
    expected = sorted(expected_cases) if expected_cases is not None else validation_cases_of_fold(folder)
    if expected is not None:
        absent = [case for case in expected if not (validation / f"{case}.npz").is_file()]
        if absent:
            raise CalibrationStepError(
                f"{validation} lacks the probabilities of validation cases {absent[:10]}"
                f"{' ...' if len(absent) > 10 else ''} ({len(absent)} of {len(expected)}; interrupted validation?); "
                f"run {fold.calibrate_command()} (it validates again, streaming the statistics), or "
                f"{fold.train_command('--val --npz')} first"
            )


def write_calibrated_checkpoint(folder: Path, temperature: float | None, log: Callable[..., None],
                                checkpoint: str | None = CHECKPOINT_FINAL, scale: list[float] | None = None) -> dict:
    """Fold ``temperature`` into a calibrated copy of ``folder``'s checkpoint ``checkpoint`` (the one whose outputs
    T was fitted on): ``checkpoint_final_calibrated.pth``, or ``checkpoint_best_calibrated.pth`` for
    ``checkpoint_best.pth`` (:func:`~nnunet_mbls.layout.calibrated_name`).

    Args:
        checkpoint: the checkpoint file name; None when the validated weights are in no checkpoint file (e.g.
            ``nnUNetv2_train --disable_checkpointing``): nothing is written.
        scale: one factor per output channel instead of 1 / ``temperature`` (per-region temperatures: 1 / T_r).

    Returns what calibration.json records about it: ``calibrated_checkpoint`` (the file name, None without
    that checkpoint), ``checkpoint_temperature`` and ``source_checkpoint`` (name and SHA-256 of the
    checkpoint the calibrated one derives from, also stored inside it; see
    :func:`~nnunet_mbls.calibration.folds.state.calibration_problem`).
    """
    source = folder / checkpoint if checkpoint is not None else None
    if source is None or not source.is_file():
        log(f"nnunet-mbls: the validated weights are in no checkpoint file of {folder} ("
            + (f"{source.name} not found; " if source is not None else "")
            + "checkpointing disabled?); no calibrated checkpoint written, calibration.json records T only")
        return {"calibrated_checkpoint": None, "checkpoint_temperature": None, "source_checkpoint": None}
    calibrated = calibrated_name(source.name)
    if scale is None:
        fold_temperature_into_checkpoint(source, folder / calibrated, temperature, overwrite=True)
    else:
        fold_logit_affine_into_checkpoint(source, folder / calibrated, scale, overwrite=True)
    return {"calibrated_checkpoint": calibrated, "checkpoint_temperature": temperature,
            "source_checkpoint": source_of(folder / calibrated)}


def source_of(calibrated_checkpoint: Path) -> dict:
    """The ``mbls_source`` (file name and SHA-256 of the trained checkpoint) stored in a calibrated checkpoint."""
    return torch.load(calibrated_checkpoint, map_location="cpu", weights_only=False, mmap=True)["mbls_source"]


def calibrate_output_folder(
    output_folder: str | os.PathLike,
    max_voxels: int = MAX_VOXELS,
    seed: int = SEED,
    region: str = METRIC_REGION,
    log: Callable[..., None] = print,
    progress: bool = True,
    expected_cases: list[str] | None = None,
    fit_region: str | None = None,
    write_checkpoint: bool = True,
    num_processes: int | None = None,
    model_id: str | None = None,
    checkpoint: str | None = CHECKPOINT_FINAL,
) -> dict:
    """Run the calibration step on a fold folder whose ``validation_statistics/`` holds every validation case's
    streamed statistics (:mod:`nnunet_mbls.calibration.evaluation.export`), or else whose ``validation/`` holds
    nnU-Net ``.npz`` files.

    ``expected_cases``: the fold's validation cases (the trainer passes its own split); by default they are read
    from ``splits_final.json``. A missing ``.npz`` among them is an error, never a silently smaller fit.
    ``write_checkpoint``: fold this fold's T into ``checkpoint_final_calibrated.pth`` (False when an ensemble
    temperature goes there instead, see :func:`~nnunet_mbls.calibration.folds.ensemble.calibrate_ensemble`).
    ``num_processes``: worker processes over the cases (see :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder`; None:
    nnU-Net's default_num_processes); the result is the same for any value. ``model_id``: use statistics only
    when they were computed by these weights (:func:`~nnunet_mbls.calibration.evaluation.export.weights_id`).
    ``checkpoint``: the checkpoint file whose outputs were validated (``checkpoint_best.pth`` after
    ``nnUNetv2_train --val_best``; None: in no file), the one T is folded into (see
    :func:`write_calibrated_checkpoint`). Our trainers call this on rank 0 of
    nnU-Net's training process with the default: 'spawn' workers start clean there (no CUDA state, no DDP group),
    as nnU-Net's own validation export pool just did in that process.
    """
    folder = Path(output_folder)
    with fold_lock(folder, what="the calibration step"):
        return _calibrate_locked_fold(folder, max_voxels, seed, region, log, progress, expected_cases,
                                      fit_region or FIT_REGION, write_checkpoint, num_processes, model_id, checkpoint)


def _calibrate_locked_fold(folder: Path, max_voxels: int, seed: int, region: str, log: Callable[..., None],
                           progress: bool, expected_cases: list[str] | None, fit_region: str, write_checkpoint: bool,
                           num_processes: int | None, model_id: str | None, checkpoint: str | None) -> dict:
    fold = FoldFolder.at(folder)
    fit, statistics = fit_on_folds([folder], [expected_cases], region, fit_region, max_voxels, seed, progress,
                                   num_processes, model_id)
    write_fit_details(fold.calibration_details, fit, f"{folder.parent.name} {folder.name}: {region} voxels, pooled")
    calibrated = (write_calibrated_checkpoint(folder, fit.temperature, log, checkpoint) if write_checkpoint else
                  {"calibrated_checkpoint": None, "checkpoint_temperature": None, "source_checkpoint": None})
    summary = {
        **fit_record(fit, region, fit_region, max_voxels, seed, "every validation case of this fold"),
        **calibrated,
        "checkpoint_calibration": "this fold's temperature" if calibrated["calibrated_checkpoint"] else None,
        "statistics": statistics,
        "nnunet_mbls_version": __version__,
    }
    atomic_write_json(fold.calibration_record, summary)
    log_fit(log, folder.name, fit, region)
    return summary
