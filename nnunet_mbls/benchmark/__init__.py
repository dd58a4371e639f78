"""The benchmark harness: ``nnunet-mbls benchmark`` over a grid of (dataset, configuration, fold, trainer).

``grid`` (the cells and their state), ``training`` (one cell through nnU-Net's trainer machinery),
``jobs`` (the grid as scheduler jobs), ``run`` (train, calibrate, tabulate), ``cases`` (per-case rows),
``results`` (the numbers of the table), ``failure`` (failure-detection statistics) and ``report`` (the tables
and plots).
"""

from .run import BenchmarkCellsFailed, run_benchmark

__all__ = ["BenchmarkCellsFailed", "run_benchmark"]
