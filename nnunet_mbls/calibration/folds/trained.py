"""``nnunet-mbls calibrate`` on any trained model (stock ``nnUNetTrainer`` included): the fold folders, with
nnU-Net's validation rerun where their probabilities are missing, then the calibration step or the ensemble's."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...layout import FoldFolder
from ...locks import fold_locks
from .ensemble import calibrate_ensemble
from .step import CalibrationStepError, calibrate_output_folder, validation_cases_of_fold


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
    :func:`~nnunet_mbls.calibration.folds.ensemble.calibrate_ensemble`). Runs nnU-Net's own final validation with probabilities first where
    ``validation/`` lacks the ``.npz`` of a validation case (never validated with probabilities, an interrupted
    validation, or a trainer that deleted them after its own calibration step). ``num_processes``: worker
    processes over the cases of the calibration step (None: nnU-Net's default_num_processes).
    """
    folds = [str(f) for f in fold] if isinstance(fold, (list, tuple)) else [str(fold)]
    with fold_locks([FoldFolder.of(dataset, configuration, f, trainer, plans).path for f in folds]):
        folders = [prepare_fold_for_calibration(dataset, configuration, f, trainer, plans, device) for f in folds]
        if len(folders) == 1:
            return calibrate_output_folder(folders[0], num_processes=num_processes, **kwargs)
        return calibrate_ensemble(folders, num_processes=num_processes, **kwargs)


def prepare_fold_for_calibration(dataset: str, configuration: str, fold: str, trainer: str, plans: str,
                                 device: str) -> Path:
    """The fold folder, trained, with every validation case's probabilities (validation is run if needed)."""
    fold_folder = FoldFolder.of(dataset, configuration, fold, trainer, plans)
    folder = fold_folder.path
    if not fold_folder.checkpoint_final.is_file():
        raise CalibrationStepError(
            f"{fold_folder.checkpoint_final} does not exist: train first with {fold_folder.train_command('--npz')}")
    expected = validation_cases_of_fold(folder)
    have = {npz.name[: -len(".npz")] for npz in fold_folder.validation.glob("*.npz")}
    if not have or (expected is not None and not set(expected) <= have):
        run_validation_with_probabilities(dataset, configuration, fold, trainer, plans, device)
    return folder


def run_validation_with_probabilities(dataset, configuration, fold, trainer, plans, device) -> None:
    """nnU-Net's final validation (as ``nnUNetv2_train ... --val --npz``), in this process."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from ...paths import env_with_ext_trainers

    os.environ["nnUNet_extTrainer"] = env_with_ext_trainers()["nnUNet_extTrainer"]
    instance = get_trainer_from_args(str(dataset), configuration, int(fold) if fold != "all" else fold, trainer, plans, device=torch.device(device))
    maybe_load_checkpoint(instance, continue_training=False, validation_only=True)
    # the stock method: our trainers' own override would run the calibration step a second time
    nnUNetTrainer.perform_actual_validation(instance, save_probabilities=True)
