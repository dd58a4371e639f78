"""``nnunet-mbls calibrate`` on any trained model (stock ``nnUNetTrainer`` included): the fold folders, with
nnU-Net's validation rerun where their probabilities are missing, then the calibration step or the ensemble's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...defaults import FIT_REGION, METRIC_REGION, SEED
from ...layout import FoldFolder
from ...locks import fold_locks
from ..evaluation.export import weights_id
from .ensemble import calibrate_ensemble
from .step import CalibrationStepError, calibrate_output_folder, streamed_cases, validation_cases_of_fold
from .validation import run_streamed_validation


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

    ``fold``: one fold (its own T) or a list of folds (one T for their ensemble, see
    :func:`~nnunet_mbls.calibration.folds.ensemble.calibrate_ensemble`). Where a fold's ``validation_statistics/``
    lacks a validation case, or holds statistics of other weights than ``checkpoint_final.pth``'s (and
    ``validation/`` has no ``.npz`` of every case either), nnU-Net's own final validation runs first with the
    statistics streamed out of its export (:func:`~nnunet_mbls.calibration.folds.validation.run_streamed_validation`;
    no probability file). ``num_processes``: worker processes over the cases of the ``.npz`` route (None: nnU-Net's
    default_num_processes).
    """
    folds = [str(f) for f in fold] if isinstance(fold, (list, tuple)) else [str(fold)]
    refuse_region_based(FoldFolder.of(dataset, configuration, folds[0], trainer, plans))
    settings = {"region": kwargs.get("region") or METRIC_REGION, "fit_region": kwargs.get("fit_region") or FIT_REGION,
                "seed": kwargs.get("seed", SEED)}
    with fold_locks([FoldFolder.of(dataset, configuration, f, trainer, plans).path for f in folds]):
        # every fold on one route: the .npz only when every fold has them, else statistics (validating where missing)
        npz_everywhere = all(has_every_npz(FoldFolder.of(dataset, configuration, f, trainer, plans)) for f in folds)
        prepared = [prepare_fold_for_calibration(dataset, configuration, f, trainer, plans, device, **settings,
                                                 npz_allowed=npz_everywhere) for f in folds]
        folders = [folder for folder, _ in prepared]
        if len(folders) == 1:
            return calibrate_output_folder(folders[0], num_processes=num_processes, model_id=prepared[0][1], **kwargs)
        return calibrate_ensemble(folders, num_processes=num_processes, **kwargs)


def refuse_region_based(fold: FoldFolder) -> None:
    """CalibrationStepError when the model is region-based: its calibration step (per-region temperatures) runs in
    our trainers' validation, not here."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    dataset_json = fold.trainer_folder / "dataset.json"
    if not dataset_json.is_file():
        return
    content = json.loads(dataset_json.read_text())
    if LabelManager(content["labels"], content.get("regions_class_order")).has_regions:
        raise CalibrationStepError(
            f"{fold.trainer_folder} is region-based (one sigmoid per region): its per-region temperatures are fitted "
            f"by our trainers' validation; run {fold.train_command('--val')} with an nnunet-mbls trainer "
            f"(nnunet-mbls calibrate serves softmax models)")


def has_every_npz(fold: FoldFolder) -> bool:
    """Whether ``validation/`` holds the ``.npz`` of every validation case of the fold."""
    expected = validation_cases_of_fold(fold.path)
    have = {npz.name[: -len(".npz")] for npz in fold.validation.glob("*.npz")}
    return bool(have) and (expected is None or set(expected) <= have)


def prepare_fold_for_calibration(dataset: str, configuration: str, fold: str, trainer: str, plans: str, device: str,
                                 region: str = METRIC_REGION, fit_region: str = FIT_REGION,
                                 seed: int = SEED, npz_allowed: bool = True) -> tuple[Path, str | None]:
    """The fold folder, trained, with every validation case's streamed statistics computed by the weights of
    ``checkpoint_final.pth`` (nnU-Net's validation is run, streaming, when they are missing or stale), or, as
    before (and when ``npz_allowed``), every case's ``.npz``.

    Returns:
        (the fold folder, the id of the weights the statistics were computed with; None: the ``.npz`` route).
    """
    fold_folder = FoldFolder.of(dataset, configuration, fold, trainer, plans)
    folder = fold_folder.path
    if not fold_folder.checkpoint_final.is_file():
        raise CalibrationStepError(
            f"{fold_folder.checkpoint_final} does not exist: train first with {fold_folder.train_command()}")
    expected = validation_cases_of_fold(folder)
    checkpoint = torch.load(fold_folder.checkpoint_final, map_location="cpu", weights_only=False, mmap=True)
    model_id = weights_id(checkpoint["network_weights"])
    if streamed_cases(folder, expected, region, fit_region, model_id, seed) is not None:
        return folder, model_id
    if npz_allowed and has_every_npz(fold_folder):
        return folder, None
    return folder, run_streamed_validation(dataset, configuration, fold, trainer, plans, device, region, fit_region, seed)
