"""One calibration for the ensemble of several folds of a trainer, folded into every fold.

nnU-Net's predictor averages the folds' logits, so a temperature folded into every fold's head gives exactly
softmax(mean_k l_k / T). :func:`calibrate_ensemble` fits it on the pooled out-of-fold validation cases,
:func:`calibrate_on_calibration_set` on the ensemble's actual output on a labelled held-out set. The record:
``<trainer folder>/calibration_ensemble.json`` (and ``calibration_ensemble/``); every fold's calibration.json
says that its calibrated checkpoint holds the shared map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from ... import __version__
from ...defaults import FIT_REGION, MAX_VOXELS, METRIC_REGION, SEED
from ..evaluation import case_workers
from ...io import atomic_write_json, partial_folder
from ...layout import CALIBRATED_CHECKPOINT, CHECKPOINT_FINAL, ENSEMBLE_DETAILS, ENSEMBLE_RECORD, FoldFolder, fold_name
from ...layout import trainer_folder as model_folder_of
from ...locks import fold_locks
from .records import TemperatureFit, fit_record, log_fit, write_fit_details
from ..case_statistics import StatisticsSettings
from ..evaluation import LabelInfo
from ..evaluation.export import PREDICTOR_MODULE, StatisticsExport, streaming_validation_export
from .step import (CalibrationStepError, calibrate_output_folder, fit_on_folds, fit_temperature_on_streamed,
                   write_calibrated_checkpoint)


@case_workers()  # every fold's calibration step and the pooled fit share their worker processes
def calibrate_ensemble(
    folders: list[str | os.PathLike],
    max_voxels: int = MAX_VOXELS,
    seed: int = SEED,
    region: str = METRIC_REGION,
    fit_region: str | None = None,
    log: Callable[..., None] = print,
    progress: bool = True,
    num_processes: int | None = None,
) -> dict:
    """One temperature for the ensemble of ``folders`` (fold folders of one trainer), folded into each.

    nnU-Net's predictor averages the folds' logits, so T folded into every fold's head gives exactly
    softmax(mean_k l_k / T). T is fitted on the pooled out-of-fold validation cases (each case predicted by
    the fold that did not train on it). Each fold's own calibration step runs too (its T stays in its
    calibration.json); ``<trainer folder>/calibration_ensemble.json`` and ``calibration_ensemble/`` hold the
    pooled fit; every fold's calibration.json says that its calibrated checkpoint holds the ensemble T.
    """
    folders = [Path(f) for f in folders]
    fit_region = fit_region or FIT_REGION
    parents = {f.resolve().parent for f in folders}
    if len(parents) != 1 or len(set(folders)) != len(folders):
        raise CalibrationStepError(f"the folds of an ensemble must be distinct folds of one trainer folder, got {folders}")
    trainer_folder = parents.pop()
    with fold_locks(folders):
        return _calibrate_locked_ensemble(trainer_folder, folders, max_voxels, seed, region, fit_region, log, progress,
                                          num_processes)


def _calibrate_locked_ensemble(trainer_folder: Path, folders: list[Path], max_voxels: int, seed: int, region: str,
                               fit_region: str, log: Callable[..., None], progress: bool,
                               num_processes: int | None) -> dict:
    for folder in folders:
        calibrate_output_folder(folder, max_voxels, seed, region, log, progress, fit_region=fit_region,
                                write_checkpoint=False, num_processes=num_processes)
    fit, statistics = fit_on_folds(folders, [None] * len(folders), region, fit_region, max_voxels, seed, progress,
                                   num_processes)
    fold_names = [fold_name(f) for f in folders]
    write_fit_details(trainer_folder / ENSEMBLE_DETAILS, fit,
                      f"{trainer_folder.name} folds {', '.join(fold_names)}: {region} voxels, pooled out-of-fold")
    return finish_shared_temperature(trainer_folder, folders, fit, region, fit_region, max_voxels, seed,
                                     f"the out-of-fold validation cases of folds {', '.join(fold_names)}", log,
                                     statistics=statistics)


def finish_shared_temperature(trainer_folder: Path, folders: list[Path], fit: TemperatureFit, region: str,
                              fit_region: str, max_voxels: int, seed: int, voxels_of: str,
                              log: Callable[..., None], **extra) -> dict:
    """Fold a shared T into every fold, record it in each calibration.json and in calibration_ensemble.json."""
    with fold_locks(folders):
        fold_temperatures = {}
        for folder in folders:
            calibrated = write_calibrated_checkpoint(folder, fit.temperature, log)
            record_file = FoldFolder.at(folder).calibration_record
            record = json.loads(record_file.read_text()) if record_file.is_file() else {}
            fold_temperatures[folder.name] = record.get("temperature")
            record.update(calibrated, checkpoint_calibration=f"shared temperature of folds {[f.name for f in folders]} "
                                                             f"(../{ENSEMBLE_RECORD})" if calibrated["calibrated_checkpoint"]
                                                             else None)
            atomic_write_json(record_file, record)
        return _write_shared_record(trainer_folder, folders, fit, region, fit_region, max_voxels, seed, voxels_of, log,
                                    fold_temperatures, **extra)


def _write_shared_record(trainer_folder: Path, folders: list[Path], fit: TemperatureFit, region: str, fit_region: str,
                         max_voxels: int, seed: int, voxels_of: str, log: Callable[..., None],
                         fold_temperatures: dict, **extra) -> dict:
    summary = {
        **fit_record(fit, region, fit_region, max_voxels, seed, voxels_of),
        "folds": [fold_name(f) for f in folders],
        "fold_temperatures": fold_temperatures,
        "calibrated_checkpoints": f"{CALIBRATED_CHECKPOINT} of every listed fold holds this temperature",
        **extra,
        "nnunet_mbls_version": __version__,
    }
    atomic_write_json(trainer_folder / ENSEMBLE_RECORD, summary)
    log_fit(log, f"shared by folds {', '.join(summary['folds'])}", fit, region)
    return summary


def calibrate_on_calibration_set(
    dataset: str, configuration: str, folds: list, trainer: str, plans: str, images: str | os.PathLike,
    labels: str | os.PathLike, device: str = "cuda", step_size: float = 0.5, disable_tta: bool = False,
    max_voxels: int = MAX_VOXELS, seed: int = SEED, region: str = METRIC_REGION, fit_region: str | None = None,
    log: Callable[..., None] = print, progress: bool = True, num_processes: int | None = None,
) -> dict:
    """One temperature for the ensemble of ``folds``, fitted on its actual output on a labelled held-out set.

    nnU-Net's own predictor (the listed folds' ``checkpoint_final.pth``, mirroring TTA unless ``disable_tta``,
    ``step_size``: the ensemble as deployed) predicts ``images``, each case's statistics streamed out of its export
    against ``labels`` (no probability file; the segmentations and statistics go to a temporary folder inside the
    trainer folder, deleted afterwards); T is fitted on them and folded into every listed fold like an ensemble T.
    ``num_processes`` is unused (kept for the command's signature: the statistics need no worker pool).
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    images, labels = Path(images), Path(labels)
    for name, folder in (("IMAGES", images), ("LABELS", labels)):
        if not folder.is_dir():
            raise CalibrationStepError(f"--calibration-set {name} {folder} is not a folder; pass the held-out images "
                                       f"(nnU-Net naming, CASE_0000.nii.gz) and their reference segmentations")
    fit_region = fit_region or FIT_REGION
    model_folder = model_folder_of(dataset, trainer, plans, configuration)
    fold_folders = [FoldFolder.of(dataset, configuration, f, trainer, plans) for f in folds]
    folders = [f.path for f in fold_folders]
    for fold in fold_folders:
        if not fold.checkpoint_final.is_file():
            raise CalibrationStepError(f"{fold.checkpoint_final} does not exist: train first with {fold.train_command()}")
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    cases = calibration_set_cases(images, labels, dataset_json["file_ending"])
    label_info = LabelInfo.from_dataset_json(dataset_json)
    settings = StatisticsSettings(label_info.num_classes, label_info.ignore_label, region, fit_region, seed=seed)
    with fold_locks(folders), partial_folder(model_folder) as tmp:
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                    perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=progress)
        predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in folds],
                                                       CHECKPOINT_FINAL)
        refuse_cascade_stage(predictor, configuration, "calibrate")
        job = StatisticsExport(settings, str(labels), str(Path(tmp) / "statistics"), "calibration set")
        with streaming_validation_export(job, PREDICTOR_MODULE):
            predictor.predict_from_files_sequential(str(images), str(tmp), save_probabilities=False, overwrite=True)
        fit, statistics = fit_temperature_on_streamed(labels, [Path(job.output_folder)], [Path(tmp)], [cases],
                                                      dataset_json, max_voxels, seed, progress)
        write_fit_details(model_folder / ENSEMBLE_DETAILS, fit,
                          f"{model_folder.name} folds {', '.join(map(str, folds))}: calibration set, {region} voxels")
        return finish_shared_temperature(
            model_folder, folders, fit, region, fit_region, max_voxels, seed,
            f"the {fit.before['num_cases']} cases of the calibration set {images}", log, statistics=statistics,
            fit_data={"calibration_set": {"images": str(images.resolve()), "labels": str(labels.resolve()),
                                          "tta": not disable_tta, "step_size": step_size}})


def refuse_cascade_stage(predictor, configuration: str, command: str) -> None:
    """``--calibration-set`` predicts with nnU-Net's predictor, which needs the previous stage's segmentations for a
    cascade stage: refused, naming the out-of-fold route that works there.

    Raises:
        CalibrationStepError: ``configuration`` is a cascade stage.
    """
    previous = predictor.configuration_manager.previous_stage_name
    if previous is not None:
        raise CalibrationStepError(
            f"{configuration} is a cascade stage (after {previous}): --calibration-set is not supported there; use the "
            f"folds' out-of-fold validation cases (nnunet-mbls {command} without --calibration-set)")


def calibration_set_cases(images: Path, labels: Path, ending: str) -> list[str]:
    """The cases of a calibration set (``CASE_0000<ending>`` in ``images``), each with its reference in ``labels``.

    Raises:
        CalibrationStepError: no image, or images without a reference (named).
    """
    channel_0 = f"_0000{ending}"
    cases = sorted(p.name[: -len(channel_0)] for p in images.iterdir() if p.name.endswith(channel_0))
    if not cases:
        raise CalibrationStepError(f"--calibration-set IMAGES {images} holds no CASE{channel_0} file (nnU-Net naming)")
    missing = [c for c in cases if not (labels / f"{c}{ending}").is_file()]
    if missing:
        raise CalibrationStepError(f"--calibration-set LABELS {labels} lacks the references of {missing[:10]} "
                                   f"({len(missing)} of {len(cases)}); pass one {ending} per image case")
    return cases
