"""Shared fixtures: nnU-Net folders in a temporary directory, real nnU-Net commands on tiny data, and a calibrated
hand-made fold. Helpers live in the ``helpers`` package (tests/ is on sys.path: ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # plain asserts in helpers report their values, as in test modules

from helpers.folders import make_fold  # noqa: E402
from helpers.nnunet import NnUNet  # noqa: E402
from helpers.probabilities import sample_cases  # noqa: E402


@pytest.fixture(scope="session")
def nnunet_3d(tmp_path_factory) -> tuple[NnUNet, str]:
    """A planned tiny 3D synthetic dataset (8 cases of 24x32x32): (runner, dataset folder name)."""
    from nnunet_mbls.data.synthetic import make_synthetic_dataset

    nn = NnUNet(tmp_path_factory.mktemp("nnunet3d"))
    folder = make_synthetic_dataset(nn.raw, dataset_id=501, name="Tiny3D", num_cases=8, shape=(24, 32, 32), seed=0)
    nn.plan(501, "3d_fullres")
    return nn, folder.name


@pytest.fixture(scope="session")
def trained_stock_3d(nnunet_3d) -> tuple[NnUNet, str, Path]:
    """Stock nnU-Net Dice+CE (short budget) trained on fold 0 with --npz: (runner, dataset, fold folder)."""
    nn, dataset = nnunet_3d
    nn.train(501, "3d_fullres", "nnUNetTrainerStock_test", "0", "--npz")
    return nn, dataset, nn.fold_folder(dataset, "nnUNetTrainerStock_test", "3d_fullres")


@pytest.fixture
def calibrated_fold(tmp_path, monkeypatch):
    """A hand-made trained fold calibrated by the real step: (fold folder, env for the console script)."""
    from nnunet_mbls.calibration.folds import calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    cases = {f"case_{i}": c for i, c in enumerate(sample_cases(4, seed=1, shape=(6, 8, 7)))}
    fold = make_fold(tmp_path, cases, list(cases))
    calibrate_output_folder(fold, progress=False, log=lambda *a: None)
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1"}
    (tmp_path / "raw").mkdir()
    return fold, env
