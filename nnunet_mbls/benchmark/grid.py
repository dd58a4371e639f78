"""The benchmark grid: one cell per (dataset, configuration, fold, trainer), and what is done in it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    """One trained model of the benchmark: nnU-Net's (dataset, configuration, fold, trainer, plans)."""

    dataset: str  # DatasetXXX_Name
    configuration: str
    fold: str
    trainer: str
    plans: str = "nnUNetPlans"

    @property
    def folder(self) -> Path:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return Path(get_output_folder(self.dataset, self.trainer, self.plans, self.configuration, self.fold))

    @property
    def dataset_id(self) -> int:
        return int(self.dataset[len("Dataset") : len("Dataset") + 3])

    def is_trained(self) -> bool:
        return (self.folder / "checkpoint_final.pth").is_file()

    def is_calibrated(self) -> bool:
        """The calibration step finished on today's checkpoint (read from the files, see ``calibration_problem``)."""
        from ..calibrate import calibration_problem

        return calibration_problem(self.folder) is None

    def label(self) -> str:
        return f"{self.dataset} {self.configuration} fold {self.fold} {self.trainer}"

    def missing_reason(self) -> str:
        """Why an unfinished cell is not in the table, and the command that finishes it."""
        from ..calibrate import calibrate_command

        if self.is_trained():
            return f"trained, calibration step missing or failed: {calibrate_command(self.folder)}"
        return "not trained (benchmark --train, or --emit-jobs)"


def dataset_name(dataset: str | int) -> str:
    """DatasetXXX_Name for an id or a name (nnU-Net's lookup in nnUNet_raw/preprocessed/results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(str(dataset) if str(dataset).startswith("Dataset") else int(dataset))


def make_grid(datasets, configuration: str, folds, trainers, plans: str = "nnUNetPlans") -> list[Cell]:
    """All cells, dataset-major, then fold, then trainer (so a partial run has every trainer per fold)."""
    return [
        Cell(dataset_name(d), configuration, str(f), t, plans)
        for d, f, t in itertools.product(datasets, folds, trainers)
    ]
