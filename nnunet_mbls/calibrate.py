"""The calibration step of a trained nnU-Net fold: metrics before/after temperature scaling, the
fitted temperature, and ``checkpoint_final_calibrated.pth`` with T folded into the head.

Outputs in the fold folder (never inside ``validation/``, whose files nnU-Net's evaluation and
ensembling glob):

- ``calibration.json``: T, the fit's voxel subsample, mean/pooled metrics before and after;
- ``calibration/``: full per-case evaluations (``evaluation_before.json``, ``evaluation_after.json``)
  and ``reliability.png`` (before vs after);
- ``checkpoint_final_calibrated.pth``: a copy of ``checkpoint_final.pth`` whose segmentation head
  outputs logits / T. ``checkpoint_final.pth`` is never modified.

The temperature is fitted on a bounded, seeded, uniform subsample (``max_voxels``, default 10^6) of
the voxels inside nnU-Net's crop box of every validation case (ignore label excluded), so the fit
costs the same on a 2D toy fold and on a 3D CT fold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .calibration.reliability import plot_reliability
from .calibration.temperature import VoxelSubsampler, fit_temperature, fold_temperature_into_checkpoint
from .evaluation import evaluate_folder
from .io import atomic_write_json

DEFAULT_MAX_VOXELS = 1_000_000
#: the fitted T is clipped to this range (a fold where every voxel is right drives T to the lower bound)
T_BOUNDS = (0.05, 20.0)
CALIBRATED_CHECKPOINT = "checkpoint_final_calibrated.pth"


class CalibrationStepError(RuntimeError):
    """The calibration step cannot run; the message says what to run first."""


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


def calibrate_output_folder(
    output_folder: str | os.PathLike,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    seed: int = 0,
    region: str = "fg",
    log: Callable[..., None] = print,
    progress: bool = True,
    expected_cases: list[str] | None = None,
) -> dict:
    """Run the calibration step on a fold folder whose ``validation/`` holds nnU-Net ``.npz`` files.

    ``expected_cases``: the fold's validation cases (the trainer passes its own split); by default they are read
    from ``splits_final.json``. A missing ``.npz`` among them is an error, never a silently smaller fit.
    """
    folder = Path(output_folder)
    validation = folder / "validation"
    if not validation.is_dir() or not any(validation.glob("*.npz")):
        raise CalibrationStepError(
            f"{validation} has no .npz probabilities; run {train_command(folder, '--val --npz')} first "
            f"(or nnunet-mbls calibrate, which does it for you)"
        )
    import json

    dataset_json = json.loads((folder.parent / "dataset.json").read_text())
    gt = gt_folder_for(folder)
    expected = sorted(expected_cases) if expected_cases is not None else validation_cases_of_fold(folder)
    if expected is not None:
        absent = [case for case in expected if not (validation / f"{case}.npz").is_file()]
        if absent:
            raise CalibrationStepError(
                f"{validation} lacks the probabilities of validation cases {absent[:10]}"
                f"{' ...' if len(absent) > 10 else ''} ({len(absent)} of {len(expected)}; interrupted validation?); "
                f"run {train_command(folder, '--val --npz')} first"
            )
    subsample = VoxelSubsampler(max_voxels=max_voxels, seed=seed)
    # gt_segmentations holds every training case, validation/ only this fold's: chill (completeness checked above)
    plans = folder.parent / "plans.json"  # nnU-Net writes it into every trainer folder
    before = evaluate_folder(
        gt, validation, dataset_json, region=region, progress=progress, chill=True, plans=plans,
        on_case=lambda case, probs, ref, mask: subsample.add(torch.from_numpy(probs), torch.from_numpy(ref), torch.from_numpy(mask)),
    )
    log_probs, target = subsample.arrays()
    temperature = fit_temperature(log_probs, target, t_bounds=T_BOUNDS)
    after = evaluate_folder(gt, validation, dataset_json, region=region, temperature=temperature, progress=progress,
                            chill=True, plans=plans)
    at_bound = "lower" if temperature <= T_BOUNDS[0] else "upper" if temperature >= T_BOUNDS[1] else None

    details = folder / "calibration"
    atomic_write_json(details / "evaluation_before.json", before)
    atomic_write_json(details / "evaluation_after.json", after)
    plot_reliability(
        {
            f"before (ECE {before['mean']['ece']:.4f})": before["reliability"],
            f"after T={temperature:.3f} (ECE {after['mean']['ece']:.4f})": after["reliability"],
        },
        details / "reliability.png",
        title=f"{folder.parent.name} {folder.name}: {region} voxels, pooled",
    )
    checkpoint = folder / "checkpoint_final.pth"
    calibrated = None
    if checkpoint.is_file():
        fold_temperature_into_checkpoint(checkpoint, folder / CALIBRATED_CHECKPOINT, temperature, overwrite=True)
        calibrated = CALIBRATED_CHECKPOINT
    else:
        log(f"nnunet-mbls: {checkpoint} not found (checkpointing disabled?); no calibrated checkpoint written")
    summary = {
        "temperature": temperature,
        "temperature_bounds": list(T_BOUNDS),
        "temperature_at_bound": at_bound,
        "fit": {
            "objective": "mean NLL of softmax(log p / T)",
            "voxels": "uniform subsample of the voxels inside nnU-Net's crop box of every validation case, ignore label excluded",
            "subsample_size": int(target.numel()),
            "max_voxels": max_voxels,
            "seed": seed,
        },
        "metric_region": region,
        "num_cases": before["num_cases"],
        "before": metric_summary(before),
        "after": metric_summary(after),
        "calibrated_checkpoint": calibrated,
        "nnunet_mbls_version": __version__,
    }
    atomic_write_json(folder / "calibration.json", summary)
    log(
        f"nnunet-mbls calibration: T = {temperature:.4f}; {region} ECE {before['mean']['ece']:.4f} -> "
        f"{after['mean']['ece']:.4f}, NLL {before['mean']['nll']:.4f} -> {after['mean']['nll']:.4f}"
        + (f"; wrote {calibrated}" if calibrated else "")
    )
    if at_bound:
        log(
            f"nnunet-mbls calibration: T hit the {at_bound} bound {temperature:g} of {list(T_BOUNDS)}: "
            + ("nearly every validation voxel is already right, so the NLL keeps falling as T shrinks"
               if at_bound == "lower" else "the validation predictions are mostly wrong, so the NLL prefers uniform probabilities")
            + "; the fit carries little information (a tiny or degenerate validation set?)"
        )
    return summary


def calibrate_trained_model(
    dataset: str,
    configuration: str,
    fold: int | str,
    trainer: str,
    plans: str = "nnUNetPlans",
    device: str = "cuda",
    **kwargs,
) -> dict:
    """``nnunet-mbls calibrate``: the calibration step for any trained model, stock nnUNetTrainer included.

    Runs nnU-Net's own final validation with probabilities first when ``validation/`` lacks the ``.npz`` of
    a validation case (never validated with probabilities, or an interrupted validation).
    """
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
    return calibrate_output_folder(folder, **kwargs)


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
