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
#: the calibrated copy of checkpoint_best.pth, written when nnU-Net validated it (``nnUNetv2_train ... --val_best``)
CALIBRATED_BEST_CHECKPOINT = "checkpoint_best_calibrated.pth"
CALIBRATION_RECORD = "calibration.json"
CALIBRATION_DETAILS = "calibration"
ENSEMBLE_RECORD = "calibration_ensemble.json"
ENSEMBLE_DETAILS = "calibration_ensemble"
#: per-case calibration statistics streamed out of the validation export (one small file per case)
VALIDATION_STATISTICS = "validation_statistics"
FOLD_PREFIX = "fold_"


def calibrated_name(checkpoint: str) -> str:
    """The file our calibration step folds a calibration of nnU-Net checkpoint ``checkpoint`` into:
    ``checkpoint_final.pth`` -> ``checkpoint_final_calibrated.pth``, ``checkpoint_best.pth`` ->
    ``checkpoint_best_calibrated.pth``."""
    return f"{Path(checkpoint).stem}_calibrated.pth"


def dataset_name(dataset: str | int) -> str:
    """``DatasetXXX_Name`` for an id or a name, found as nnU-Net finds it (raw, preprocessed, results).

    Imports nnU-Net (``maybe_convert_to_dataset_name``).

    Args:
        dataset: an id (``27``, ``"027"``) or a name starting with ``Dataset``.

    Returns:
        The dataset's folder name.

    Raises:
        ValueError: ``dataset`` is neither a name starting with ``Dataset`` nor an integer (from ``int``).
        RuntimeError: nnU-Net finds no dataset, or several, with that id (raised by nnU-Net).
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    text = str(dataset)
    return maybe_convert_to_dataset_name(text if text.startswith("Dataset") else int(text))


def dataset_id(name: str) -> int:
    """The id of a ``DatasetXXX_Name`` (nnU-Net's ``convert_dataset_name_to_id``, without importing nnU-Net).

    Args:
        name: a dataset folder name, ``Dataset`` followed by three digits.

    Returns:
        The id, e.g. 27 for ``Dataset027_Name``.

    Raises:
        ValueError: ``name`` does not start with ``Dataset`` and three digits.
    """
    if not name.startswith("Dataset") or not name[len("Dataset"):len("Dataset") + 3].isdigit():
        raise ValueError(f"{name!r} is not an nnU-Net dataset folder name; expected DatasetXXX_Name")
    return int(name[len("Dataset"):len("Dataset") + 3])


def fold_name(folder: str | os.PathLike) -> str:
    """The fold of a ``fold_<k>`` folder.

    Args:
        folder: the fold folder (only its name is read).

    Returns:
        The part after ``fold_``, e.g. ``"0"`` or ``"all"``.

    Raises:
        ValueError: the folder's name does not start with ``fold_``.
    """
    name = Path(folder).name
    if not name.startswith(FOLD_PREFIX):
        raise ValueError(f"{folder} is not an nnU-Net fold folder (fold_<k>)")
    return name[len(FOLD_PREFIX):]


def trainer_folder(dataset: str | int, trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`` (nnU-Net's ``get_output_folder``).

    Args:
        dataset: an id or a ``DatasetXXX_Name`` (see :func:`dataset_name`).
        trainer: the trainer class name, e.g. ``nnUNetTrainerMbLS``.
        plans: the plans identifier, e.g. ``nnUNetPlans``.
        configuration: e.g. ``2d`` or ``3d_fullres``.

    Returns:
        The trainer folder (it need not exist).

    Raises:
        ValueError, RuntimeError: as :func:`dataset_name`.
    """
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
        """The fold folder ``path``, its model read from the folder names (nnU-Net's naming).

        Args:
            path: a fold folder; symbolic links are resolved to read the names.

        Returns:
            The :class:`FoldFolder`; dataset, trainer, plans, configuration and fold are None when the path
            is not ``<dataset>/<trainer>__<plans>__<configuration>/fold_<k>``.
        """
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
        """The fold folder of a model under ``$nnUNet_results`` (it need not exist).

        Args:
            dataset: an id or a ``DatasetXXX_Name``; commands name the dataset as ``dataset`` does (an id stays
                an id).
            configuration: e.g. ``2d``.
            fold: e.g. ``0`` or ``"all"``.
            trainer: the trainer class name.
            plans: the plans identifier (default ``nnUNetPlans``).

        Returns:
            The :class:`FoldFolder`.

        Raises:
            ValueError, RuntimeError: as :func:`dataset_name`.
        """
        return cls(trainer_folder(dataset, trainer, plans, configuration) / f"{FOLD_PREFIX}{fold}", str(dataset),
                   trainer, plans, configuration, str(fold))

    @classmethod
    def in_trainer_folder(cls, trainer_folder: str | os.PathLike, fold: str | int) -> "FoldFolder":
        """Fold ``fold`` of a trainer folder ``<trainer>__<plans>__<configuration>``.

        Args:
            trainer_folder: the trainer folder.
            fold: e.g. ``0`` or ``"all"``.

        Returns:
            :meth:`at` of ``trainer_folder/fold_<fold>``.
        """
        return cls.at(Path(trainer_folder) / f"{FOLD_PREFIX}{fold}")

    @property
    def trainer_folder(self) -> Path:
        """The folder above this fold (``<trainer>__<plans>__<configuration>``)."""
        return self.path.parent

    @property
    def checkpoint_final(self) -> Path:
        """nnU-Net's ``checkpoint_final.pth`` of this fold."""
        return self.path / CHECKPOINT_FINAL

    @property
    def calibrated_checkpoint(self) -> Path:
        """Our ``checkpoint_final_calibrated.pth`` (the calibration folded into the head)."""
        return self.path / CALIBRATED_CHECKPOINT

    @property
    def calibration_record(self) -> Path:
        """Our ``calibration.json`` of this fold."""
        return self.path / CALIBRATION_RECORD

    @property
    def calibration_details(self) -> Path:
        """Our ``calibration/`` folder of this fold (``evaluation_{before,after}.json``, ``reliability.png``)."""
        return self.path / CALIBRATION_DETAILS

    @property
    def validation(self) -> Path:
        """nnU-Net's ``validation/`` folder of this fold."""
        return self.path / VALIDATION

    @property
    def validation_statistics(self) -> Path:
        """Our ``validation_statistics/`` folder: one ``<case>.npz`` of calibration statistics per validation case,
        streamed out of nnU-Net's validation export (:mod:`nnunet_mbls.calibration.streaming`)."""
        return self.path / VALIDATION_STATISTICS

    @property
    def ensemble_record(self) -> Path:
        """The record of a calibration shared by folds of this trainer folder."""
        return self.trainer_folder / ENSEMBLE_RECORD

    def _model_args(self, fold: str | None = None) -> tuple[str, str, str, str, str]:
        if self.dataset is None:
            return "DATASET", "CONFIGURATION", fold or "FOLD", "TRAINER", "PLANS"
        return self.dataset, self.configuration, fold or self.fold, self.trainer, self.plans

    def train_command(self, *extra: str) -> str:
        """The ``nnUNetv2_train`` command of this fold, with ``extra`` flags.

        Args:
            *extra: further arguments appended as given, e.g. ``"--npz"``.

        Returns:
            The command line; placeholders (``DATASET``, ...) where the folder does not follow nnU-Net's layout.
        """
        dataset, configuration, fold, trainer, plans = self._model_args()
        return " ".join((f"nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans}",) + extra)

    def calibrate_command(self, folds: str | None = None) -> str:
        """The ``nnunet-mbls calibrate`` command that (re)does this fold's calibration (or that of ``folds``).

        Args:
            folds: the ``-f`` value to use instead of this fold, e.g. ``"0 1 2 3 4"`` for an ensemble; None
                (default) for this fold.

        Returns:
            The command line; placeholders (``DATASET``, ...) where the folder does not follow nnU-Net's layout.
        """
        dataset, configuration, fold, trainer, plans = self._model_args(folds)
        return f"nnunet-mbls calibrate -d {dataset} -c {configuration} -f {fold} -tr {trainer} -p {plans}"
