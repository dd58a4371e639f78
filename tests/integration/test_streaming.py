"""Statistics streamed out of nnU-Net's validation export (issue 19), with real nnU-Net runs on CPU: `calibrate` on
a stock model without `--npz`, equality with the `.npz` route of nnU-Net's own export of the same checkpoint, the
same statistics whichever process exports which cases (as under DDP), and an ensemble of a `.npz` fold with a
streamed one. (No probability file at any time during our trainers' training: tests/integration/
test_nnunet_integration.py, whose training is watched.)"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from helpers.nnunet import BIN

pytestmark = pytest.mark.integration

KEYS = ("ece", "cece", "nll", "brier", "mce", "ece_adaptive", "n_voxels")


@pytest.fixture(scope="module")
def streamed_stock_fold(nnunet_3d):
    """Stock nnU-Net trained on fold 1 without --npz, then `nnunet-mbls calibrate` (which validates, streaming)."""
    nn, dataset = nnunet_3d
    nn.train(501, "3d_fullres", "nnUNetTrainerStock_test", "1")
    fold = nn.fold_folder(dataset, "nnUNetTrainerStock_test", "3d_fullres", 1)
    assert not list((fold / "validation").glob("*.npz"))
    nn.run("nnunet-mbls", "calibrate", "-d", "501", "-c", "3d_fullres", "-f", "1", "-tr", "nnUNetTrainerStock_test",
           "-device", "cpu")
    return nn, dataset, fold


def test_calibrate_a_stock_model_streams_and_equals_the_npz_route(streamed_stock_fold):
    from nnunet_mbls.calibration.folds.step import fit_temperature_on

    nn, dataset, fold = streamed_stock_fold
    calibration = json.loads((fold / "calibration.json").read_text())
    assert calibration["statistics"]["source"].startswith("statistics streamed")
    assert not list((fold / "validation").glob("*.npz"))  # calibrate validated without writing probabilities
    streamed = {stage: json.loads((fold / "calibration" / f"evaluation_{stage}.json").read_text())
                for stage in ("before", "after")}
    # nnU-Net's own --val --npz of the same checkpoint (stock validation: it leaves validation_statistics/ alone)
    nn.run("nnUNetv2_train", "501", "3d_fullres", "1", "-tr", "nnUNetTrainerStock_test", "--val", "--npz",
           "-device", "cpu", training=True)
    try:
        dataset_json = json.loads((fold.parent / "dataset.json").read_text())
        npz = fit_temperature_on(nn.preprocessed / dataset / "gt_segmentations", [fold / "validation"], dataset_json,
                                 fold.parent / "plans.json", "fg", "all", 10**6, 0, progress=False)
    finally:
        for leftover in [*(fold / "validation").glob("*.npz"), *(fold / "validation").glob("*.pkl")]:
            leftover.unlink()
    assert calibration["temperature"] == pytest.approx(npz.temperature, rel=1e-5)
    for stage, expected in (("before", npz.before), ("after", npz.after)):
        for case, metrics in expected["per_case"].items():
            for key in KEYS:
                assert streamed[stage]["per_case"][case][key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-6)


def test_statistics_do_not_depend_on_which_process_exports_which_cases(streamed_stock_fold):
    """Under DDP each rank exports cases val_keys[rank::world]. nnU-Net 2.8.1's trainer puts every DDP rank on CUDA,
    so on the CPU the two ranks are two processes that each validate their share (do_split restricted the same way);
    every statistics file equals the one-process file, and the step on them gives the same T."""
    nn, dataset, fold = streamed_stock_fold
    one_process = {p.name: dict(np.load(p)) for p in (fold / "validation_statistics").iterdir()}
    T = json.loads((fold / "calibration.json").read_text())["temperature"]
    shutil.rmtree(fold / "validation_statistics")
    script = """
import sys, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_mbls.calibration.folds import validation
rank, world = int(sys.argv[1]), 2
split = nnUNetTrainer.do_split
nnUNetTrainer.do_split = lambda self: (lambda tr_val: (tr_val[0], tr_val[1][rank::world]))(split(self))
validation.run_streamed_validation("501", "3d_fullres", "1", "nnUNetTrainerStock_test", "nnUNetPlans", "cpu")
"""
    env = dict(nn.env, nnUNet_n_proc_DA="0")
    ranks = [subprocess.Popen([str(BIN / "python"), "-c", script, str(rank)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for rank in ranks:
        output = rank.communicate()[0]
        assert rank.returncode == 0, output[-4000:]
    two_processes = {p.name: dict(np.load(p)) for p in (fold / "validation_statistics").iterdir()}
    assert sorted(two_processes) == sorted(one_process) and len(one_process) == 2
    for name, arrays in one_process.items():
        assert arrays.keys() == two_processes[name].keys()
        for key, value in arrays.items():
            np.testing.assert_array_equal(two_processes[name][key], value, err_msg=f"{name} {key}")
    nn.run("nnunet-mbls", "calibrate", "-d", "501", "-c", "3d_fullres", "-f", "1", "-tr", "nnUNetTrainerStock_test",
           "-device", "cpu")
    assert json.loads((fold / "calibration.json").read_text())["temperature"] == T


def test_ensemble_of_a_npz_fold_and_a_streamed_fold_streams_both(streamed_stock_fold, trained_stock_3d):
    """`calibrate -f 0 1` where fold 0 kept nnU-Net's .npz (--npz) and fold 1 has statistics only: fold 0 is validated
    once more, streaming, and the shared T is fitted on both folds' pooled statistics (the .npz are left alone)."""
    from nnunet_mbls.calibration.evaluation.statistics import fit_temperature_on_statistics

    nn, dataset, fold_1 = streamed_stock_fold
    fold_0 = trained_stock_3d[2]
    npz_before = sorted(p.name for p in (fold_0 / "validation").glob("*.npz"))
    nn.run("nnunet-mbls", "calibrate", "-d", "501", "-c", "3d_fullres", "-f", "0", "1", "-tr", "nnUNetTrainerStock_test",
           "-device", "cpu")
    record = json.loads((fold_1.parent / "calibration_ensemble.json").read_text())
    assert record["statistics"]["source"].startswith("statistics streamed")
    assert sorted(p.name for p in (fold_0 / "validation").glob("*.npz")) == npz_before
    files = sorted((fold_0 / "validation_statistics").glob("*.npz")) + sorted((fold_1 / "validation_statistics").glob("*.npz"))
    assert len(files) == 4
    assert record["temperature"] == pytest.approx(fit_temperature_on_statistics(files, 10**6, 0)[0], rel=1e-9)
