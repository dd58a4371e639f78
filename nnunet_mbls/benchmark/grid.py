"""The benchmark grid: one cell per (dataset, configuration, fold, trainer), and what is done in it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ..layout import FoldFolder, dataset_id, dataset_name


@dataclass(frozen=True)
class Cell:
    """One trained model of the benchmark: nnU-Net's (dataset, configuration, fold, trainer, plans)."""

    dataset: str  # DatasetXXX_Name
    configuration: str
    fold: str
    trainer: str
    plans: str = "nnUNetPlans"

    @property
    def fold_folder(self) -> FoldFolder:
        return FoldFolder.of(self.dataset, self.configuration, self.fold, self.trainer, self.plans)

    @property
    def folder(self) -> Path:
        return self.fold_folder.path

    @property
    def dataset_id(self) -> int:
        return dataset_id(self.dataset)

    def is_trained(self) -> bool:
        return self.fold_folder.checkpoint_final.is_file()

    def is_calibrated(self) -> bool:
        """The calibration step finished on today's checkpoint (read from the files, see ``calibration_problem``)."""
        from ..calibration.folds import calibration_problem

        return calibration_problem(self.folder) is None

    def label(self) -> str:
        return f"{self.dataset} {self.configuration} fold {self.fold} {self.trainer}"

    def missing_reason(self) -> str:
        """Why an unfinished cell is not in the table, and the command that finishes it."""
        if self.is_trained():
            return f"trained, calibration step missing or failed: {self.fold_folder.calibrate_command()}"
        return "not trained (benchmark --train, or --emit-jobs)"


def make_grid(datasets, configuration: str, folds, trainers, plans: str = "nnUNetPlans") -> list[Cell]:
    """All cells, dataset-major, then fold, then trainer (so a partial run has every trainer per fold)."""
    return [
        Cell(dataset_name(d), configuration, str(f), t, plans)
        for d, f, t in itertools.product(datasets, folds, trainers)
    ]
