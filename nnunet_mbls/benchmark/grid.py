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
        """The cell's fold folder under ``$nnUNet_results`` (it need not exist)."""
        return FoldFolder.of(self.dataset, self.configuration, self.fold, self.trainer, self.plans)

    @property
    def folder(self) -> Path:
        """The path of :attr:`fold_folder`."""
        return self.fold_folder.path

    @property
    def dataset_id(self) -> int:
        """The id of :attr:`dataset` (ValueError when it is not a ``DatasetXXX_Name``)."""
        return dataset_id(self.dataset)

    def is_trained(self) -> bool:
        """Whether nnU-Net's training finished (``checkpoint_final.pth`` exists)."""
        return self.fold_folder.checkpoint_final.is_file()

    def is_calibrated(self) -> bool:
        """The calibration step finished on today's checkpoint (read from the files, see ``calibration_problem``)."""
        from ..calibration.folds import calibration_problem

        return calibration_problem(self.folder) is None

    def label(self) -> str:
        """``"<dataset> <configuration> fold <k> <trainer>"``, for logs and lists."""
        return f"{self.dataset} {self.configuration} fold {self.fold} {self.trainer}"

    def missing_reason(self) -> str:
        """Why an unfinished cell is not in the table, and the command that finishes it."""
        if self.is_trained():
            return f"trained, calibration step missing or failed: {self.fold_folder.calibrate_command()}"
        return "not trained (benchmark --train, or --emit-jobs)"


def make_grid(datasets, configuration: str, folds, trainers, plans: str = "nnUNetPlans") -> list[Cell]:
    """All cells, dataset-major, then fold, then trainer (so a partial run has every trainer per fold).

    Args:
        datasets: dataset ids or names (each resolved with :func:`~nnunet_mbls.layout.dataset_name`).
        configuration: the nnU-Net configuration of every cell.
        folds: the folds.
        trainers: the trainer class names.
        plans: the plans identifier (default ``nnUNetPlans``).

    Returns:
        One :class:`Cell` per (dataset, fold, trainer).

    Raises:
        ValueError, RuntimeError: a dataset nnU-Net cannot find (see :func:`~nnunet_mbls.layout.dataset_name`).
    """
    return [
        Cell(dataset_name(d), configuration, str(f), t, plans)
        for d, f, t in itertools.product(datasets, folds, trainers)
    ]
