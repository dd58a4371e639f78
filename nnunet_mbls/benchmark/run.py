"""``nnunet-mbls benchmark``: train (optionally), calibrate and tabulate a grid of nnU-Net models.

For each dataset × configuration × fold × trainer: train when ``train`` is set and the fold is not
finished (interrupted folds continue from their latest checkpoint), run the calibration step where
it is missing (stock nnU-Net trainers included), then write ``<out>/<dataset>/results.{md,csv,json}``
and the plots. ``collect_only`` skips training and calibration and reports the missing cells.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import NnunetMblsError
from .grid import Cell, make_grid
from .report import write_results
from .results import build_results


def dataset_description(dataset: str) -> str:
    """The ``description`` of the dataset's preprocessed ``dataset.json``.

    Args:
        dataset: the ``DatasetXXX_Name``.

    Returns:
        The description; "" when ``nnUNet_preprocessed`` is unset or the file or key is missing.
    """
    from nnunetv2.paths import nnUNet_preprocessed

    path = Path(nnUNet_preprocessed) / dataset / "dataset.json" if nnUNet_preprocessed else None
    if path is None or not path.is_file():
        return ""
    return json.loads(path.read_text()).get("description", "")


def prepare_cell(cell: Cell, train: bool, device: str, epochs: int | None, iterations: int | None,
                 logs: Path, log: Callable[[str], None]) -> None:
    """Train (if asked and unfinished) and calibrate (if missing) one cell.

    Args:
        cell: the cell.
        train: train an untrained cell; without it an untrained cell is only logged.
        device: the device of training and calibration.
        epochs: epochs of training; None keeps the trainer's.
        iterations: iterations per epoch; None keeps the trainer's.
        logs: folder of nnU-Net's console output, one file per cell (created when training).
        log: called with one progress line at a time.
    """
    from ..calibration.folds import calibrate_trained_model
    from .training import train_cell

    if cell.is_calibrated():
        log(f"done already: {cell.label()}")
        return
    if not cell.is_trained():
        if not train:
            log(f"not trained (pass --train, or use --emit-jobs): {cell.label()}")
            return
        logs.mkdir(parents=True, exist_ok=True)
        log(f"training {cell.label()} (nnU-Net output in {logs})")
        train_cell(cell, device, epochs, iterations, log_file=logs / f"{cell.trainer}__{cell.configuration}__fold_{cell.fold}.log")
    if not cell.is_calibrated():
        log(f"calibrating {cell.label()}")
        calibrate_trained_model(cell.dataset, cell.configuration, cell.fold, cell.trainer, cell.plans, device=device)


class BenchmarkCellsFailed(NnunetMblsError, RuntimeError):
    """Some cells failed; the others were done and the tables written (``written``: dataset -> results.md)."""

    def __init__(self, failures: list[str], written: dict[str, Path]) -> None:
        super().__init__(f"{len(failures)} cell(s) failed, the table holds the others: " + "; ".join(failures))
        self.failures, self.written = failures, written


def run_benchmark(
    datasets: list[str | int],
    configuration: str,
    folds: list[str | int],
    trainers: list[str],
    plans: str = "nnUNetPlans",
    train: bool = False,
    collect_only: bool = False,
    baseline: str | None = "nnUNetTrainer",
    out: str | os.PathLike = "benchmark",
    device: str = "cuda",
    epochs: int | None = None,
    iterations: int | None = None,
    log: Callable[[str], None] = print,
    vector_scaling: bool = False,
    conformal_alpha: float | None = None,
) -> dict[str, Path]:
    """Run the benchmark over the grid datasets × folds × trainers of one configuration.

    A cell that fails (training, or a calibration step) is logged and skipped, so one bad fold does not stop
    a grid; the tables are written from the finished cells. Running the same command again resumes: a
    trained fold whose calibration step failed is only calibrated, never trained again.

    Args:
        datasets: dataset ids or names.
        configuration: the nnU-Net configuration.
        folds: the folds.
        trainers: the trainer class names.
        plans: the plans identifier (default ``nnUNetPlans``).
        train: train untrained cells (default False: only calibrate and tabulate).
        collect_only: skip training and calibration, only tabulate (and report the missing cells).
        baseline: the trainer the others are compared with (default ``nnUNetTrainer``).
        out: the output folder; each dataset's tables go to ``<out>/<dataset>/`` (default ``benchmark``).
        device: the device of training and calibration (default ``"cuda"``).
        epochs: epochs per training; None keeps the trainer's.
        iterations: iterations per epoch; None keeps the trainer's.
        log: called with one progress line at a time (default ``print``).
        vector_scaling: add the shared vector-scaling stage (default False).
        conformal_alpha: measure how tight the conformal guarantees are at this α (default None: not measured).

    Returns:
        Dataset name -> path of its ``results.md``.

    Raises:
        BenchmarkCellsFailed: at the end, when some cell failed (the tables are written nevertheless; its
            ``written`` holds the paths).
    """
    cells = make_grid(datasets, configuration, folds, trainers, plans)
    out = Path(out)
    failures = []
    if not collect_only:
        for cell in cells:
            try:
                prepare_cell(cell, train, device, epochs, iterations, out / cell.dataset / "logs", log)
            except Exception as error:  # noqa: BLE001 - reported per cell and raised at the end
                failures.append(f"{cell.label()}: {type(error).__name__}: {error}")
                log(f"FAILED {failures[-1]}")
    written = {}
    for dataset in dict.fromkeys(c.dataset for c in cells):
        results = build_results([c for c in cells if c.dataset == dataset], baseline, vector_scaling, device,
                                conformal_alpha)
        written[dataset] = write_results(dataset, results, out / dataset, dataset_description(dataset))
    if failures:
        raise BenchmarkCellsFailed(failures, written)
    return written
