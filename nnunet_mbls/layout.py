"""nnU-Net's folder layout in one place: which trained model a folder holds, the files we read and write there,
and the commands that (re)make them.

A fold folder is ``$nnUNet_results/<DatasetXXX_Name>/<trainer>__<plans>__<configuration>/fold_<k>``; nnU-Net's
own helpers (``nnunetv2.utilities.file_path_utilities``, ``dataset_name_id_conversion``) build and parse those
names, and every module of ours asks this one instead of slicing names by hand. Light to import: nnU-Net is
imported only by the functions that look folders up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# files nnU-Net writes into a fold folder
CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
VALIDATION = "validation"
# files and folders we write
CALIBRATED_CHECKPOINT = "checkpoint_final_calibrated.pth"
CALIBRATION_RECORD = "calibration.json"
CALIBRATION_DETAILS = "calibration"
ENSEMBLE_RECORD = "calibration_ensemble.json"
ENSEMBLE_DETAILS = "calibration_ensemble"
FOLD_PREFIX = "fold_"


def dataset_name(dataset: str | int) -> str:
    """``DatasetXXX_Name`` for an id (``27``, ``"027"``) or a name, found as nnU-Net finds it (raw, preprocessed,
    results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    text = str(dataset)
    return maybe_convert_to_dataset_name(text if text.startswith("Dataset") else int(text))


def dataset_id(name: str) -> int:
    """The id of a ``DatasetXXX_Name`` (nnU-Net's ``convert_dataset_name_to_id``, without importing nnU-Net)."""
    if not name.startswith("Dataset") or not name[len("Dataset"):len("Dataset") + 3].isdigit():
        raise ValueError(f"{name!r} is not an nnU-Net dataset folder name; expected DatasetXXX_Name")
    return int(name[len("Dataset"):len("Dataset") + 3])


def fold_name(folder: str | os.PathLike) -> str:
    """The fold of a ``fold_<k>`` folder (``"0"``, ``"all"``)."""
    name = Path(folder).name
    if not name.startswith(FOLD_PREFIX):
        raise ValueError(f"{folder} is not an nnU-Net fold folder (fold_<k>)")
    return name[len(FOLD_PREFIX):]


def trainer_folder(dataset: str | int, trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`` (nnU-Net's ``get_output_folder``)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(dataset_name(dataset), trainer, plans, configuration))


@dataclass(frozen=True)
class FoldFolder:
    """One trained fold's folder and the files of ours and nnU-Net's in it.

    ``dataset`` (the folder name, or the id or name a user gave), ``trainer``, ``plans``, ``configuration`` and
    ``fold`` are None where the path does not follow nnU-Net's layout (a hand-made folder): the files are still
    found, and commands show placeholders.
    """

    path: Path
    dataset: str | None = None
    trainer: str | None = None
    plans: str | None = None
    configuration: str | None = None
    fold: str | None = None

    @classmethod
    def at(cls, path: str | os.PathLike) -> "FoldFolder":
        """The fold folder ``path``, its model read from the folder names (nnU-Net's naming)."""
        path = Path(path)
        resolved = path.resolve()
        parts = resolved.parent.name.split("__")
        if len(parts) != 3 or not resolved.name.startswith(FOLD_PREFIX):
            return cls(path)
        trainer, plans, configuration = parts
        return cls(path, resolved.parent.parent.name, trainer, plans, configuration, fold_name(resolved))

    @classmethod
    def of(cls, dataset: str | int, configuration: str, fold: str | int, trainer: str,
           plans: str = "nnUNetPlans") -> "FoldFolder":
        """The fold folder of a model under ``$nnUNet_results`` (it need not exist); commands name the dataset as
        ``dataset`` does (an id stays an id)."""
        return cls(trainer_folder(dataset, trainer, plans, configuration) / f"{FOLD_PREFIX}{fold}", str(dataset),
                   trainer, plans, configuration, str(fold))

    @classmethod
    def in_trainer_folder(cls, trainer_folder: str | os.PathLike, fold: str | int) -> "FoldFolder":
        """Fold ``fold`` of a trainer folder ``<trainer>__<plans>__<configuration>``."""
        return cls.at(Path(trainer_folder) / f"{FOLD_PREFIX}{fold}")

    @property
    def trainer_folder(self) -> Path:
        return self.path.parent

    @property
    def checkpoint_final(self) -> Path:
        return self.path / CHECKPOINT_FINAL

    @property
    def calibrated_checkpoint(self) -> Path:
        return self.path / CALIBRATED_CHECKPOINT

    @property
    def calibration_record(self) -> Path:
        return self.path / CALIBRATION_RECORD

    @property
    def calibration_details(self) -> Path:
        return self.path / CALIBRATION_DETAILS

    @property
    def validation(self) -> Path:
        return self.path / VALIDATION

    @property
    def ensemble_record(self) -> Path:
        """The record of a calibration shared by folds of this trainer folder."""
        return self.trainer_folder / ENSEMBLE_RECORD

    def _model_args(self, fold: str | None = None) -> tuple[str, str, str, str, str]:
        if self.dataset is None:
            return "DATASET", "CONFIGURATION", fold or "FOLD", "TRAINER", "PLANS"
        return self.dataset, self.configuration, fold or self.fold, self.trainer, self.plans

    def train_command(self, *extra: str) -> str:
        """The ``nnUNetv2_train`` command of this fold, with ``extra`` flags."""
        dataset, configuration, fold, trainer, plans = self._model_args()
        return " ".join((f"nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans}",) + extra)

    def calibrate_command(self, folds: str | None = None) -> str:
        """The ``nnunet-mbls calibrate`` command that (re)does this fold's calibration (or that of ``folds``)."""
        dataset, configuration, fold, trainer, plans = self._model_args(folds)
        return f"nnunet-mbls calibrate -d {dataset} -c {configuration} -f {fold} -tr {trainer} -p {plans}"
