"""The calibration step of trained nnU-Net folds: metrics before/after temperature scaling, the fitted
temperature, and ``checkpoint_final_calibrated.pth`` with T folded into the head.

One fold (:func:`calibrate_output_folder`, what our trainers run after nnU-Net's validation): outputs in the
fold folder (never inside ``validation/``, whose files nnU-Net's evaluation and ensembling glob):

- ``calibration.json``: T, the fit's voxel subsample, mean/pooled metrics before and after, and which
  temperature the calibrated checkpoint holds (``checkpoint_temperature``, ``checkpoint_calibration``);
- ``calibration/``: full per-case evaluations (``evaluation_before.json``, ``evaluation_after.json``)
  and ``reliability.png`` (before vs after);
- ``checkpoint_final_calibrated.pth``: a copy of ``checkpoint_final.pth`` whose segmentation head
  outputs logits / T. ``checkpoint_final.pth`` is never modified.

Several folds (:func:`calibrate_ensemble`): one T for their ensemble, fitted on their pooled out-of-fold
validation cases and folded into every fold, recorded in ``<trainer folder>/calibration_ensemble.json``
(and ``calibration_ensemble/``); :func:`calibrate_on_calibration_set` fits that T on the ensemble's output on
a labelled held-out set instead. Vector scaling lives in :mod:`nnunet_mbls.vector_scaling`.

The temperature is fitted on a bounded, seeded, uniform subsample (``max_voxels``, default 10^6) of the
voxels of ``fit_region`` (inside nnU-Net's crop box, or the foreground) of every case (ignore label
excluded), so the fit costs the same on a 2D toy fold and on a 3D CT fold.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .calibration.reliability import plot_reliability
from .calibration.temperature import (VoxelSubsampler, case_candidates, fit_temperature,
                                      fold_temperature_into_checkpoint)
from .evaluation import case_workers, evaluate_folder
from .io import atomic_write_json, file_sha256, partial_folder
from .locks import fold_lock

DEFAULT_MAX_VOXELS = 1_000_000
#: voxels the temperature is fitted on: "all" inside nnU-Net's crop box, or "fg" (ground truth != 0)
FIT_REGIONS = ("all", "fg")
FIT_REGION_VOXELS = {"all": "voxels inside nnU-Net's crop box", "fg": "foreground voxels (ground truth != 0)"}
DEFAULT_FIT_REGION = "all"
FIT_REGION_REASON = (
    "all (the default, measured: docs/BENCHMARKS.md 'Which voxels to fit T on'): on the demo's 40 out-of-fold cases "
    "fitting T on the foreground lowered the foreground ECE (stock nnU-Net 0.034 -> 0.028) but raised the ECE and NLL "
    "of all crop-box voxels, which is what users receive (0.0084 -> 0.0101, 0.0987 -> 0.1002)"
)
ENSEMBLE_FILE = "calibration_ensemble.json"
#: the fitted T is clipped to this range (a fold where every voxel is right drives T to the lower bound)
T_BOUNDS = (0.05, 20.0)
CALIBRATED_CHECKPOINT = "checkpoint_final_calibrated.pth"


class CalibrationStepError(RuntimeError):
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


def fold_identity(folder: Path) -> tuple[str, str, str, str, str] | None:
    """(dataset, configuration, fold, trainer, plans) of <results>/<dataset>/<trainer>__<plans>__<configuration>/fold_k."""
    parts = folder.resolve().parent.name.split("__")
    if len(parts) != 3 or not folder.name.startswith("fold_"):
        return None
    trainer, plans, configuration = parts
    return folder.resolve().parent.parent.name, configuration, folder.name[len("fold_"):], trainer, plans


def train_command(folder: Path, *extra: str) -> str:
    """The ``nnUNetv2_train`` command of a fold folder."""
    identity = fold_identity(folder)
    if identity is None:
        return " ".join(("nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS",) + extra)
    dataset, configuration, fold, trainer, plans = identity
    return " ".join((f"nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans}",) + extra)


def calibrate_command(folder: Path) -> str:
    """The ``nnunet-mbls calibrate`` command that (re)does the calibration step of a fold folder."""
    identity = fold_identity(folder)
    if identity is None:
        return "nnunet-mbls calibrate -d DATASET -c CONFIGURATION -f FOLD -tr TRAINER -p PLANS"
    dataset, configuration, fold, trainer, plans = identity
    return f"nnunet-mbls calibrate -d {dataset} -c {configuration} -f {fold} -tr {trainer} -p {plans}"


def validation_cases_of_fold(folder: Path) -> list[str] | None:
    """The fold's validation cases from nnUNet_preprocessed/<dataset>/splits_final.json (None if unknown)."""
    import json

    from nnunetv2.paths import nnUNet_preprocessed

    fold = folder.name[len("fold_"):]
    if fold == "all":
        return None  # validated on every training case: whatever gt_segmentations holds
    splits_file = Path(nnUNet_preprocessed) / folder.resolve().parent.parent.name / "splits_final.json"
    if not fold.isdigit() or not splits_file.is_file():
        return None
    splits = json.loads(splits_file.read_text())
    # nnU-Net draws a random split (not saved) for a fold beyond the file's folds
    return sorted(splits[int(fold)]["val"]) if int(fold) < len(splits) else None


def metric_summary(evaluation: dict) -> dict:
    """The part of an evaluation that calibration.json keeps: means over cases and pooled values."""
    return {"mean": evaluation["mean"], "pooled": evaluation["pooled"]}


@dataclass
class TemperatureFit:
    """One temperature fitted on the validation probabilities of one or several folders, with the metrics."""

    temperature: float
    subsample_size: int
    before: dict
    after: dict

    @property
    def at_bound(self) -> str | None:
        return "lower" if self.temperature <= T_BOUNDS[0] else "upper" if self.temperature >= T_BOUNDS[1] else None


@case_workers()  # the two passes share their worker processes
def fit_temperature_on(gt: Path, prediction_folders: list[Path], dataset_json: dict, plans: Path | dict | None,
                       region: str, fit_region: str, max_voxels: int, seed: int, progress: bool,
                       chill: bool = True, num_processes: int | None = None) -> TemperatureFit:
    """Fit T on a seeded uniform subsample of the ``fit_region`` voxels of every case of the folders, then
    evaluate every case before and after (``region`` voxels). One pass for the metrics and the subsample.

    The subsample: every voxel gets a uniform key from a generator seeded by (``seed``, its case's name) and the
    ``max_voxels`` smallest keys of all cases are kept (:func:`~nnunet_mbls.calibration.temperature.case_candidates`),
    so it is the same whatever ``num_processes`` (see :func:`~nnunet_mbls.evaluation.evaluate_folder`) and the
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


def write_fit_details(details: Path, fit: TemperatureFit, title: str) -> None:
    """``evaluation_before.json``, ``evaluation_after.json`` and ``reliability.png`` (before vs after)."""
    atomic_write_json(details / "evaluation_before.json", fit.before)
    atomic_write_json(details / "evaluation_after.json", fit.after)
    plot_reliability(
        {
            f"before (ECE {fit.before['mean']['ece']:.4f})": fit.before["reliability"],
            f"after T={fit.temperature:.3f} (ECE {fit.after['mean']['ece']:.4f})": fit.after["reliability"],
        },
        details / "reliability.png",
        title=title,
    )


def fit_record(fit: TemperatureFit, region: str, fit_region: str, max_voxels: int, seed: int, voxels_of: str) -> dict:
    """What calibration.json and calibration_ensemble.json say about a fit."""
    return {
        "temperature": fit.temperature,
        "temperature_bounds": list(T_BOUNDS),
        "temperature_at_bound": fit.at_bound,
        "fit": {
            "objective": "mean NLL of softmax(log p / T)",
            "fit_region": fit_region,
            "fit_region_default": FIT_REGION_REASON,
            "voxels": f"uniform subsample of the {FIT_REGION_VOXELS[fit_region]} of {voxels_of}, ignore label excluded",
            "sampling": "the max_voxels smallest of uniform keys drawn per case from a generator seeded by (seed, case "
                        "name): the same for any number of worker processes",
            "subsample_size": fit.subsample_size,
            "max_voxels": max_voxels,
            "seed": seed,
        },
        "metric_region": region,
        "num_cases": fit.before["num_cases"],
        "before": metric_summary(fit.before),
        "after": metric_summary(fit.after),
    }


def log_fit(log: Callable[..., None], what: str, fit: TemperatureFit, region: str) -> None:
    log(f"nnunet-mbls calibration ({what}): T = {fit.temperature:.4f}; {region} ECE {fit.before['mean']['ece']:.4f} -> "
        f"{fit.after['mean']['ece']:.4f}, NLL {fit.before['mean']['nll']:.4f} -> {fit.after['mean']['nll']:.4f}")
    if fit.at_bound:
        log(
            f"nnunet-mbls calibration: T hit the {fit.at_bound} bound {fit.temperature:g} of {list(T_BOUNDS)}: "
            + ("nearly every validation voxel is already right, so the NLL keeps falling as T shrinks"
               if fit.at_bound == "lower" else "the validation predictions are mostly wrong, so the NLL prefers uniform probabilities")
            + "; the fit carries little information (a tiny or degenerate validation set?)"
        )


def check_validation_complete(folder: Path, expected_cases: list[str] | None = None) -> None:
    """CalibrationStepError naming the command unless ``validation/`` holds every validation case's ``.npz``."""
    validation = folder / "validation"
    if not validation.is_dir() or not any(validation.glob("*.npz")):
        raise CalibrationStepError(
            f"{validation} has no .npz probabilities; run {train_command(folder, '--val --npz')} first "
            f"(or nnunet-mbls calibrate, which does it for you)"
        )
    expected = sorted(expected_cases) if expected_cases is not None else validation_cases_of_fold(folder)
    if expected is not None:
        absent = [case for case in expected if not (validation / f"{case}.npz").is_file()]
        if absent:
            raise CalibrationStepError(
                f"{validation} lacks the probabilities of validation cases {absent[:10]}"
                f"{' ...' if len(absent) > 10 else ''} ({len(absent)} of {len(expected)}; interrupted validation?); "
                f"run {train_command(folder, '--val --npz')} first"
            )


def write_calibrated_checkpoint(folder: Path, temperature: float, log: Callable[..., None]) -> dict:
    """Fold ``temperature`` into ``folder``'s checkpoint_final_calibrated.pth.

    Returns what calibration.json records about it: ``calibrated_checkpoint`` (the file name, None without
    checkpoint_final.pth), ``checkpoint_temperature`` and ``source_checkpoint`` (name and SHA-256 of the
    checkpoint the calibrated one derives from, also stored inside it; see :func:`calibration_problem`).
    """
    checkpoint = folder / "checkpoint_final.pth"
    if not checkpoint.is_file():
        log(f"nnunet-mbls: {checkpoint} not found (checkpointing disabled?); no calibrated checkpoint written")
        return {"calibrated_checkpoint": None, "checkpoint_temperature": None, "source_checkpoint": None}
    fold_temperature_into_checkpoint(checkpoint, folder / CALIBRATED_CHECKPOINT, temperature, overwrite=True)
    return {"calibrated_checkpoint": CALIBRATED_CHECKPOINT, "checkpoint_temperature": temperature,
            "source_checkpoint": source_of(folder / CALIBRATED_CHECKPOINT)}


def source_of(calibrated_checkpoint: Path) -> dict:
    """The ``mbls_source`` (file name and SHA-256 of the trained checkpoint) stored in a calibrated checkpoint."""
    return torch.load(calibrated_checkpoint, map_location="cpu", weights_only=False, mmap=True)["mbls_source"]


def calibrate_output_folder(
    output_folder: str | os.PathLike,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    seed: int = 0,
    region: str = "fg",
    log: Callable[..., None] = print,
    progress: bool = True,
    expected_cases: list[str] | None = None,
    fit_region: str | None = None,
    write_checkpoint: bool = True,
    num_processes: int | None = None,
) -> dict:
    """Run the calibration step on a fold folder whose ``validation/`` holds nnU-Net ``.npz`` files.

    ``expected_cases``: the fold's validation cases (the trainer passes its own split); by default they are read
    from ``splits_final.json``. A missing ``.npz`` among them is an error, never a silently smaller fit.
    ``write_checkpoint``: fold this fold's T into ``checkpoint_final_calibrated.pth`` (False when an ensemble
    temperature goes there instead, see :func:`calibrate_ensemble`).
    ``num_processes``: worker processes over the cases (see :func:`~nnunet_mbls.evaluation.evaluate_folder`; None:
    nnU-Net's default_num_processes); the result is the same for any value. Our trainers call this on rank 0 of
    nnU-Net's training process with the default: 'spawn' workers start clean there (no CUDA state, no DDP group),
    as nnU-Net's own validation export pool just did in that process.
    """
    folder = Path(output_folder)
    with fold_lock(folder, what="the calibration step"):
        return _calibrate_locked_fold(folder, max_voxels, seed, region, log, progress, expected_cases,
                                      fit_region or DEFAULT_FIT_REGION, write_checkpoint, num_processes)


def _calibrate_locked_fold(folder: Path, max_voxels: int, seed: int, region: str, log: Callable[..., None],
                           progress: bool, expected_cases: list[str] | None, fit_region: str, write_checkpoint: bool,
                           num_processes: int | None) -> dict:
    import json

    check_validation_complete(folder, expected_cases)
    dataset_json = json.loads((folder.parent / "dataset.json").read_text())
    # gt_segmentations holds every training case, validation/ only this fold's: chill (completeness checked above)
    fit = fit_temperature_on(gt_folder_for(folder), [folder / "validation"], dataset_json, plans_of(folder.parent),
                             region, fit_region, max_voxels, seed, progress, num_processes=num_processes)
    write_fit_details(folder / "calibration", fit, f"{folder.parent.name} {folder.name}: {region} voxels, pooled")
    calibrated = (write_calibrated_checkpoint(folder, fit.temperature, log) if write_checkpoint else
                  {"calibrated_checkpoint": None, "checkpoint_temperature": None, "source_checkpoint": None})
    summary = {
        **fit_record(fit, region, fit_region, max_voxels, seed, "every validation case of this fold"),
        **calibrated,
        "checkpoint_calibration": "this fold's temperature" if calibrated["calibrated_checkpoint"] else None,
        "nnunet_mbls_version": __version__,
    }
    atomic_write_json(folder / "calibration.json", summary)
    log_fit(log, folder.name, fit, region)
    return summary


@case_workers()  # every fold's calibration step and the pooled fit share their worker processes
def calibrate_ensemble(
    folders: list[str | os.PathLike],
    max_voxels: int = DEFAULT_MAX_VOXELS,
    seed: int = 0,
    region: str = "fg",
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
    import json

    folders = [Path(f) for f in folders]
    fit_region = fit_region or DEFAULT_FIT_REGION
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
    import json

    for folder in folders:
        calibrate_output_folder(folder, max_voxels, seed, region, log, progress, fit_region=fit_region,
                                write_checkpoint=False, num_processes=num_processes)
    dataset_json = json.loads((trainer_folder / "dataset.json").read_text())
    fit = fit_temperature_on(gt_folder_for(folders[0]), [f / "validation" for f in folders], dataset_json,
                             plans_of(trainer_folder), region, fit_region, max_voxels, seed, progress,
                             num_processes=num_processes)
    fold_names = [f.name[len("fold_"):] for f in folders]
    write_fit_details(trainer_folder / "calibration_ensemble", fit,
                      f"{trainer_folder.name} folds {', '.join(fold_names)}: {region} voxels, pooled out-of-fold")
    return finish_shared_temperature(trainer_folder, folders, fit, region, fit_region, max_voxels, seed,
                                     f"the out-of-fold validation cases of folds {', '.join(fold_names)}", log)


def finish_shared_temperature(trainer_folder: Path, folders: list[Path], fit: TemperatureFit, region: str,
                              fit_region: str, max_voxels: int, seed: int, voxels_of: str,
                              log: Callable[..., None], **extra) -> dict:
    """Fold a shared T into every fold, record it in each calibration.json and in calibration_ensemble.json."""
    import json

    with fold_locks(folders):
        fold_temperatures = {}
        for folder in folders:
            calibrated = write_calibrated_checkpoint(folder, fit.temperature, log)
            record_file = folder / "calibration.json"
            record = json.loads(record_file.read_text()) if record_file.is_file() else {}
            fold_temperatures[folder.name] = record.get("temperature")
            record.update(calibrated, checkpoint_calibration=f"shared temperature of folds {[f.name for f in folders]} "
                                                             f"(../{ENSEMBLE_FILE})" if calibrated["calibrated_checkpoint"]
                                                             else None)
            atomic_write_json(record_file, record)
        return _write_shared_record(trainer_folder, folders, fit, region, fit_region, max_voxels, seed, voxels_of, log,
                                    fold_temperatures, **extra)


def _write_shared_record(trainer_folder: Path, folders: list[Path], fit: TemperatureFit, region: str, fit_region: str,
                         max_voxels: int, seed: int, voxels_of: str, log: Callable[..., None],
                         fold_temperatures: dict, **extra) -> dict:
    summary = {
        **fit_record(fit, region, fit_region, max_voxels, seed, voxels_of),
        "folds": [f.name[len("fold_"):] for f in folders],
        "fold_temperatures": fold_temperatures,
        "calibrated_checkpoints": f"{CALIBRATED_CHECKPOINT} of every listed fold holds this temperature",
        **extra,
        "nnunet_mbls_version": __version__,
    }
    atomic_write_json(trainer_folder / ENSEMBLE_FILE, summary)
    log_fit(log, f"shared by folds {', '.join(summary['folds'])}", fit, region)
    return summary


def calibrate_trained_model(
    dataset: str,
    configuration: str,
    fold: int | str | list,
    trainer: str,
    plans: str = "nnUNetPlans",
    device: str = "cuda",
    num_processes: int | None = None,
    **kwargs,
) -> dict:
    """``nnunet-mbls calibrate``: the calibration step for any trained model, stock nnUNetTrainer included.

    ``fold``: one fold (its own T, today's behaviour) or a list of folds (one T for their ensemble, see
    :func:`calibrate_ensemble`). Runs nnU-Net's own final validation with probabilities first where
    ``validation/`` lacks the ``.npz`` of a validation case (never validated with probabilities, an interrupted
    validation, or a trainer that deleted them after its own calibration step). ``num_processes``: worker
    processes over the cases of the calibration step (None: nnU-Net's default_num_processes).
    """
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folds = [str(f) for f in fold] if isinstance(fold, (list, tuple)) else [str(fold)]
    with fold_locks([Path(get_output_folder(dataset, trainer, plans, configuration, f)) for f in folds]):
        folders = [prepare_fold_for_calibration(dataset, configuration, f, trainer, plans, device) for f in folds]
        if len(folders) == 1:
            return calibrate_output_folder(folders[0], num_processes=num_processes, **kwargs)
        return calibrate_ensemble(folders, num_processes=num_processes, **kwargs)


@contextmanager
def fold_locks(folders: list[Path]):
    """:func:`~nnunet_mbls.locks.fold_lock` on every folder, taken in sorted order (no deadlock between two runs)."""
    with ExitStack() as stack:
        for folder in sorted({Path(f).resolve() for f in folders}):
            stack.enter_context(fold_lock(folder, what="nnunet-mbls calibrate"))
        yield


def calibrate_on_calibration_set(
    dataset: str, configuration: str, folds: list, trainer: str, plans: str, images: str | os.PathLike,
    labels: str | os.PathLike, device: str = "cuda", step_size: float = 0.5, disable_tta: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS, seed: int = 0, region: str = "fg", fit_region: str | None = None,
    log: Callable[..., None] = print, progress: bool = True, num_processes: int | None = None,
) -> dict:
    """One temperature for the ensemble of ``folds``, fitted on its actual output on a labelled held-out set.

    nnU-Net's own predictor (the listed folds' ``checkpoint_final.pth``, mirroring TTA unless ``disable_tta``,
    ``step_size``: the ensemble as deployed) predicts ``images`` with probabilities into a temporary folder
    inside the trainer folder (deleted afterwards; peak disk: one float32 .npz per case, compressed); T is
    fitted on their voxels against ``labels`` and folded into every listed fold like an ensemble T.
    """
    import json

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    images, labels = Path(images), Path(labels)
    for name, folder in (("IMAGES", images), ("LABELS", labels)):
        if not folder.is_dir():
            raise CalibrationStepError(f"--calibration-set {name} {folder} is not a folder; pass the held-out images "
                                       f"(nnU-Net naming, CASE_0000.nii.gz) and their reference segmentations")
    fit_region = fit_region or DEFAULT_FIT_REGION
    model_folder = Path(get_output_folder(dataset, trainer, plans, configuration))
    folders = [model_folder / f"fold_{f}" for f in folds]
    for folder in folders:
        if not (folder / "checkpoint_final.pth").is_file():
            raise CalibrationStepError(f"{folder / 'checkpoint_final.pth'} does not exist: train first with "
                                       f"{train_command(folder)}")
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    with fold_locks(folders), partial_folder(model_folder) as tmp:
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                    perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=progress)
        predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in folds],
                                                       "checkpoint_final.pth")
        predictor.predict_from_files_sequential(str(images), str(tmp), save_probabilities=True, overwrite=True)
        fit = fit_temperature_on(labels, [Path(tmp)], dataset_json, plans_of(model_folder), region, fit_region,
                                 max_voxels, seed, progress, num_processes=num_processes)
        write_fit_details(model_folder / "calibration_ensemble", fit,
                          f"{model_folder.name} folds {', '.join(map(str, folds))}: calibration set, {region} voxels")
        return finish_shared_temperature(
            model_folder, folders, fit, region, fit_region, max_voxels, seed,
            f"the {fit.before['num_cases']} cases of the calibration set {images}", log,
            fit_data={"calibration_set": {"images": str(images.resolve()), "labels": str(labels.resolve()),
                                          "tta": not disable_tta, "step_size": step_size}})


def calibration_problem(folder: Path) -> str | None:
    """None when the fold's calibration is complete and describes the fold's current checkpoint, else why not.

    Decided from what the files say, not from their times: ``calibration.json`` is a complete record; its
    calibrated checkpoint loads, holds the map the record names (``checkpoint_temperature``, or
    ``vector_scaling``) and derives from today's ``checkpoint_final.pth`` (SHA-256 recorded in both). Records of nnunet-mbls 0.2, which
    carry no hash, count when they are newer than ``checkpoint_final.pth``.
    """
    from .io import read_json_file

    folder = Path(folder)
    final, record_file = folder / "checkpoint_final.pth", folder / "calibration.json"
    if not final.is_file():
        return f"{final} does not exist"
    try:
        record = read_json_file(record_file, "calibration record")
    except ValueError as e:
        return str(e)
    if not isinstance(record, dict) or not isinstance(record.get("after"), dict) or not record.get("calibrated_checkpoint"):
        return f"{record_file} is incomplete (no 'after' metrics or no 'calibrated_checkpoint')"
    calibrated = folder / str(record["calibrated_checkpoint"])
    try:
        checkpoint = torch.load(calibrated, map_location="cpu", weights_only=False, mmap=True)
        held = folded_map(checkpoint)
    except Exception as e:  # missing, truncated, not a torch file, no folded map: all mean "redo the step"
        return f"{calibrated} cannot be loaded as a calibrated checkpoint ({type(e).__name__}: {e})"
    recorded = recorded_map(record, len(held[0]))
    if recorded is None or not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                                   for x, y in zip(held, recorded) for a, b in zip(x, y)):
        return f"{calibrated} holds the map {held} but {record_file} records {recorded}"
    source = record.get("source_checkpoint")
    if source is None:  # a 0.2 record: no hash to compare
        return None if record_file.stat().st_mtime >= final.stat().st_mtime else f"{final} is newer than {record_file}"
    if checkpoint.get("mbls_source") != source:
        return f"{calibrated} derives from another checkpoint than the one {record_file} names"
    if file_sha256(final) != source.get("sha256"):
        return f"{final} changed after the calibration (training continued?)"
    return None


def folded_map(checkpoint: dict) -> tuple[list[float], list[float]]:
    """(scale, bias) per class that a calibrated checkpoint's head applies to the logits."""
    affine = checkpoint["mbls_logit_affine"]
    return [float(v) for v in affine["scale"]], [float(v) for v in affine["bias"]]


def recorded_map(record: dict, num_classes: int) -> tuple[list[float], list[float]] | None:
    """(scale, bias) per class that a calibration.json says its calibrated checkpoint holds (None: invalid)."""
    T = record.get("checkpoint_temperature")
    vector = record.get("vector_scaling")
    if isinstance(T, (int, float)) and not isinstance(T, bool) and T > 0:
        return [1.0 / T] * num_classes, [0.0] * num_classes
    if isinstance(vector, dict):
        return [float(v) for v in vector["scale"]], [float(v) for v in vector["bias"]]
    return None


def ensemble_problem(folders: list[Path]) -> str | None:
    """None when calibration_ensemble.json lists exactly these folds and every fold's calibration (see
    :func:`calibration_problem`) holds the ensemble's map (its temperature or vector scaling), else why not."""
    import json

    from .io import read_json_file

    folders = [Path(f) for f in folders]
    record_file = folders[0].resolve().parent / ENSEMBLE_FILE
    try:
        record = read_json_file(record_file, "ensemble calibration record")
    except ValueError as e:
        return str(e)
    listed = record.get("folds") if isinstance(record, dict) else None
    if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(f.name[len("fold_"):] for f in folders):
        return f"{record_file} lists folds {listed}, not these"
    for folder in folders:
        problem = calibration_problem(folder)
        if problem is not None:
            return problem
        own = json.loads((folder / "calibration.json").read_text())
        num_classes = len(recorded_map(own, 1)[0]) if own.get("vector_scaling") else 1
        shared = recorded_map({"checkpoint_temperature": record.get("temperature"),
                               "vector_scaling": record.get("vector_scaling")}, num_classes)
        if recorded_map(own, num_classes) != shared:
            return f"{folder / CALIBRATED_CHECKPOINT} does not hold the shared calibration of {record_file}"
    return None


def prepare_fold_for_calibration(dataset: str, configuration: str, fold: str, trainer: str, plans: str,
                                 device: str) -> Path:
    """The fold folder, trained, with every validation case's probabilities (validation is run if needed)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folder = Path(get_output_folder(dataset, trainer, plans, configuration, fold))
    if not (folder / "checkpoint_final.pth").is_file():
        raise CalibrationStepError(
            f"{folder / 'checkpoint_final.pth'} does not exist: train first with "
            f"nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans} --npz"
        )
    expected = validation_cases_of_fold(folder)
    have = {npz.name[: -len(".npz")] for npz in (folder / "validation").glob("*.npz")}
    if not have or (expected is not None and not set(expected) <= have):
        run_validation_with_probabilities(dataset, configuration, fold, trainer, plans, device)
    return folder


def run_validation_with_probabilities(dataset, configuration, fold, trainer, plans, device) -> None:
    """nnU-Net's final validation (as ``nnUNetv2_train ... --val --npz``), in this process."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from .paths import env_with_ext_trainers

    os.environ["nnUNet_extTrainer"] = env_with_ext_trainers()["nnUNet_extTrainer"]
    instance = get_trainer_from_args(str(dataset), configuration, int(fold) if fold != "all" else fold, trainer, plans, device=torch.device(device))
    maybe_load_checkpoint(instance, continue_training=False, validation_only=True)
    # the stock method: our trainers' own override would run the calibration step a second time
    nnUNetTrainer.perform_actual_validation(instance, save_probabilities=True)
