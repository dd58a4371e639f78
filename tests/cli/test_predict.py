"""nnunet_mbls.cli.predict: a corrupt calibrated checkpoint and images with more channels than the model takes are
one error line naming the file or case and the fix, and nothing is written (issue 17)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from helpers.cli import one_error_line, run_cli
from helpers.folders import truncate, write_seg
from helpers.nnunet import BIN
from helpers.probabilities import SHAPE


def test_predict_calibrated_with_a_corrupt_calibrated_checkpoint_names_it(calibrated_fold, tmp_path):
    fold, env = calibrated_fold
    truncate(fold / "checkpoint_final_calibrated.pth")
    images = tmp_path / "images"
    images.mkdir()
    write_seg(images / "case_0000.nii.gz", np.zeros(SHAPE))
    out = tmp_path / "predictions"
    line = one_error_line(run_cli("predict", "-i", str(images), "-o", str(out), "-d", "777", "-c", "3d_fullres", "-f",
                                "0", "-tr", "Tr", "--calibrated", "-device", "cpu", "-npp", "0", env=env), "predict")
    assert "checkpoint_final_calibrated.pth" in line and "nnunet-mbls calibrate -d" in line, line
    assert not out.exists()


def _predict_stock_model(nn, dataset, tmp_path, channels: tuple[str, ...], *extra: str):
    """``nnunet-mbls predict`` of the stock test model on one training image copied as ``extra_<channel>`` files:
    (the finished process, the output folder)."""
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((nn.raw / dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    for channel in channels:
        (images / f"extra_{channel}.nii.gz").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "nnunet-mbls"), "predict", "-i", str(images), "-o", str(out), "-d", "501", "-c",
                           "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test", "-device", "cpu", "-npp", "0",
                           *extra], env=nn.env, capture_output=True, text=True)
    return proc, out


@pytest.mark.integration
def test_predict_with_two_channels_for_a_one_channel_model_names_the_case(trained_stock_3d, tmp_path):
    nn, dataset, _ = trained_stock_3d
    proc, out = _predict_stock_model(nn, dataset, tmp_path, ("0000", "0001"))
    line = one_error_line(proc, "predict")
    assert "case extra has 2 channel file(s)" in line and "expects 1" in line and "extra_0000.nii.gz" in line, line
    assert not out.exists()


@pytest.mark.integration
def test_prev_stage_predictions_on_a_single_stage_configuration_is_one_error_line(trained_stock_3d, tmp_path):
    nn, dataset, _ = trained_stock_3d
    lowres = tmp_path / "lowres"
    lowres.mkdir()
    proc, out = _predict_stock_model(nn, dataset, tmp_path, ("0000",), "-prev_stage_predictions", str(lowres))
    line = one_error_line(proc, "predict")
    assert "-prev_stage_predictions is for cascade stages; 3d_fullres has no previous stage" in line, line
    assert not out.exists()
