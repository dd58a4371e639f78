"""One temperature for an ensemble of configurations, the kind ``nnUNetv2_find_best_configuration`` may recommend
(e.g. 2d + 3d_fullres).

``nnUNetv2_ensemble`` averages the configurations' probabilities (not their logits), so no temperature folded into
the checkpoints reproduces a calibrated ensemble: softmax(l/T) averaged over configurations is not the average
tempered. Instead T is fitted on exactly what ``nnUNetv2_ensemble`` outputs: the out-of-fold validation
probabilities of the configurations (``nnUNetv2_train ... --val --npz``), averaged with nnU-Net's own
``merge_files``, and applied afterwards by ``nnunet-mbls apply-temperature`` to the ``.npz`` that
``nnUNetv2_ensemble --save_npz`` writes: normalize(p̄^(1/T)), the map the fit optimised (exact; the segmentation
is unchanged). The record goes where ``nnUNetv2_find_best_configuration`` puts the ensemble's cross-validation
(``$nnUNet_results/<dataset>/ensembles/ensemble___<model>___<model>___<folds>/calibration.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ... import __version__
from ...defaults import FIT_REGION, MAX_VOXELS, METRIC_REGION, SEED
from ...io import atomic_write_json, partial_folder
from ...layout import FoldFolder, dataset_name, trainer_folder
from .records import fit_record, log_fit, write_fit_details
from .step import CalibrationStepError, check_validation_complete, fit_temperature_on, gt_folder_for, validation_cases_of_fold


def ensemble_folder(dataset: str, model_folders: list[Path], folds: list[str]) -> Path:
    """nnU-Net's folder of an ensemble's cross-validation (``get_ensemble_name``, for any number of models)."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string

    name = "___".join(["ensemble", *(m.name for m in model_folders), folds_tuple_to_string([int(f) for f in folds])])
    return Path(nnUNet_results) / dataset_name(dataset) / "ensembles" / name


def calibrate_configuration_ensemble(dataset: str, configurations: list[str], folds: list[str], trainer: str,
                                     plans: str, max_voxels: int = MAX_VOXELS, seed: int = SEED,
                                     region: str = METRIC_REGION, fit_region: str | None = None,
                                     log: Callable[..., None] = print, progress: bool = True,
                                     num_processes: int | None = None) -> dict:
    """Fit one T on the averaged out-of-fold probabilities of ``configurations`` and write its record.

    Returns:
        The record (calibration.json's content; ``record_file`` names the file).

    Raises:
        CalibrationStepError: fewer than two configurations, a fold other than an integer, or a fold of a
            configuration without the ``.npz`` of every validation case (naming ``nnUNetv2_train ... --val --npz``).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.ensembling.ensemble import merge_files
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if len(set(configurations)) < 2 or not all(str(f).isdigit() for f in folds):
        raise CalibrationStepError(f"an ensemble of configurations needs at least two distinct -c and integer folds, got "
                                   f"-c {' '.join(configurations)} -f {' '.join(map(str, folds))}")
    models = [trainer_folder(dataset, trainer, plans, c) for c in configurations]
    cases = {}
    for model in models:
        for fold in folds:
            folder = FoldFolder.in_trainer_folder(model, fold)
            try:
                check_validation_complete(folder.path)
            except CalibrationStepError as error:
                raise CalibrationStepError(f"{error}; an ensemble of configurations is fitted on nnU-Net's averaged "
                                           f"probabilities: run {folder.train_command('--val --npz')}") from error
            cases.setdefault(fold, validation_cases_of_fold(folder.path) or sorted(
                p.name[: -len(".npz")] for p in folder.validation.glob("*.npz")))
    dataset_json = load_json(str(models[0] / "dataset.json"))
    plans_manager = PlansManager(str(models[0] / "plans.json"))
    out = ensemble_folder(dataset, models, folds)
    with partial_folder(out.parent) as tmp:
        for fold, fold_cases in cases.items():
            for case in fold_cases:  # nnUNetv2_ensemble's own averaging, probabilities kept
                merge_files([str(FoldFolder.in_trainer_folder(m, fold).validation / f"{case}.npz") for m in models],
                            str(tmp / case), dataset_json["file_ending"], plans_manager.image_reader_writer_class(),
                            plans_manager.get_label_manager(dataset_json), save_probabilities=True)
        fit = fit_temperature_on(gt_folder_for(FoldFolder.in_trainer_folder(models[0], folds[0]).path), [tmp],
                                 dataset_json, models[0] / "plans.json", region, fit_region or FIT_REGION, max_voxels,
                                 seed, progress, num_processes=num_processes)
    record = {
        **fit_record(fit, region, fit_region or FIT_REGION, max_voxels, seed,
                     "every out-of-fold validation case, averaged over the configurations as nnUNetv2_ensemble does"),
        "configurations": [m.name for m in models],
        "folds": [str(f) for f in folds],
        "apply": (f"nnUNetv2_ensemble -i <one prediction folder per configuration> -o ENSEMBLE --save_npz, then "
                  f"nnunet-mbls apply-temperature -i ENSEMBLE -o CALIBRATED --calibration-json {out / 'calibration.json'}"),
        "exactness": "exact: T is applied to the averaged probabilities it was fitted on, normalize(p^(1/T)); T folded "
                     "into each configuration's checkpoint and averaged afterwards would only approximate it",
        "nnunet_mbls_version": __version__,
    }
    write_fit_details(out / "calibration", fit, f"{out.name}: {region} voxels, pooled")
    atomic_write_json(out / "calibration.json", record)
    log_fit(log, out.name, fit, region)
    return {**record, "record_file": str(out / "calibration.json")}

