"""nnunet_mbls.calibration.folds.step: the calibration step of one fold says what to run when its inputs are
missing or incomplete, reports a degenerate fit, fits the serial temperature with worker processes, and records
the temperature it folds when runs overlap."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from helpers.folders import make_box_fold, make_fold, write_seg
from helpers.nnunet import BIN
from helpers.probabilities import BOX_SHAPE, SHAPE, softmax


def test_calibrate_with_a_checkpoint_but_no_validation_probabilities_says_what_to_run(tmp_path, monkeypatch):
    from nnunet_mbls.calibration.folds import CalibrationStepError, calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    fold = make_fold(tmp_path, {"case_0": (labels, None)}, ["case_0"])
    write_seg(fold / "validation" / "case_0.nii.gz", labels)  # segmentations alone (validation without --npz)
    with pytest.raises(CalibrationStepError) as info:
        calibrate_output_folder(fold, progress=False)
    assert "neither the streamed statistics of its validation cases (validation_statistics/) nor their .npz" in str(info.value)
    assert "nnunet-mbls calibrate -d Dataset777_Hand -c 3d_fullres -f 0 -tr Tr -p nnUNetPlans" in str(info.value)
    assert "nnUNetv2_train Dataset777_Hand 3d_fullres 0 -tr Tr -p nnUNetPlans --val --npz" in str(info.value)
    assert not (fold / "calibration.json").exists() and not (fold / "checkpoint_final_calibrated.pth").exists()


def test_calibrate_refuses_an_incomplete_validation_folder(tmp_path, monkeypatch):
    """An interrupted validation must not be calibrated (and benchmarked) on a silent subset of its cases."""
    from nnunet_mbls.calibration.folds import CalibrationStepError, calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    rng = np.random.default_rng(3)
    cases = {f"case_{i}": (rng.integers(0, 3, SHAPE), softmax(rng.normal(size=(3,) + SHAPE))) for i in range(3)}
    cases["case_1"] = (cases["case_1"][0], None)  # its .npz was never written
    cases["case_2"] = (cases["case_2"][0], None)  # not a validation case of fold 0: not expected
    fold = make_fold(tmp_path, cases, val_cases=["case_0", "case_1"])
    with pytest.raises(CalibrationStepError, match=r"validation cases \['case_1'\] \(1 of 2.*--val --npz"):
        calibrate_output_folder(fold, progress=False)
    assert not (fold / "calibration.json").exists()


def test_degenerate_temperature_fit_is_finite_bounded_and_reported(tmp_path, monkeypatch):
    """One class only and every voxel right: T goes to the documented lower bound, finite, and is reported."""
    from nnunet_mbls.calibration.folds import calibrate_output_folder
    from nnunet_mbls.defaults import T_BOUNDS

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    labels = np.zeros(SHAPE, dtype=np.uint8)  # background only
    probs = np.stack([np.full(SHAPE, 0.8), np.full(SHAPE, 0.15), np.full(SHAPE, 0.05)]).astype(np.float32)
    fold = make_fold(tmp_path, {"case_0": (labels, probs), "case_1": (labels, probs)}, ["case_0", "case_1"])
    messages = []
    summary = calibrate_output_folder(fold, progress=False, log=lambda *a: messages.append(" ".join(map(str, a))))
    assert summary["temperature"] == T_BOUNDS[0] and summary["temperature_at_bound"] == "lower"
    written = json.loads((fold / "calibration.json").read_text())
    assert written["temperature"] == T_BOUNDS[0] and written["temperature_bounds"] == list(T_BOUNDS)
    assert any("lower bound" in m for m in messages), messages
    folded = torch.load(fold / "checkpoint_final_calibrated.pth", weights_only=False)
    assert folded["mbls_temperature"] == pytest.approx(T_BOUNDS[0])
    assert torch.isfinite(folded["network_weights"]["decoder.seg_layers.0.weight"]).all()


def test_calibration_step_with_workers_fits_the_serial_temperature(tmp_path, monkeypatch):
    """Same subsample, same T, same metrics before and after; the subsample is capped (max_voxels < the voxels)."""
    import nnunetv2.paths

    from nnunet_mbls.calibration.folds import calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    fold = make_box_fold(tmp_path)
    summaries, details = {}, {}
    for n in (1, 2):
        summaries[n] = calibrate_output_folder(fold, max_voxels=2000, seed=3, progress=False, log=lambda *a: None,
                                               num_processes=n)
        details[n] = [(fold / "calibration" / f).read_text() for f in ("evaluation_before.json", "evaluation_after.json")]
    assert summaries[1]["fit"]["subsample_size"] == 2000 < 6 * np.prod(BOX_SHAPE)
    assert summaries[1]["temperature"] == summaries[2]["temperature"]
    assert 0.05 < summaries[1]["temperature"] < 20
    assert json.dumps(summaries[1], sort_keys=True) == json.dumps(summaries[2], sort_keys=True)
    assert details[1] == details[2]


def test_simultaneous_calibrations_record_the_temperature_they_fold(calibrated_fold):
    """Four runs with different subsamples (so different T) at once: whatever the interleaving, the record, the
    checkpoint and the after-evaluation agree, because the fold is locked."""
    fold, env = calibrated_fold
    procs = [subprocess.Popen([str(BIN / "nnunet-mbls"), "calibrate", "-d", "777", "-c", "3d_fullres", "-f", "0",
                               "-tr", "Tr", "--max-voxels", "40", "--seed", str(seed), "-device", "cpu"],
                              env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    fitted = {float(out.strip().splitlines()[-1].split("T = ")[1]) for out, _ in outputs}  # the command's last line
    assert len(fitted) > 1  # the runs disagree, so an interleaving would show
    record = json.loads((fold / "calibration.json").read_text())
    folded = torch.load(fold / "checkpoint_final_calibrated.pth", weights_only=False)["mbls_temperature"]
    after = json.loads((fold / "calibration" / "evaluation_after.json").read_text())["temperature"]
    assert record["temperature"] == record["checkpoint_temperature"] == pytest.approx(folded, rel=1e-12)
    assert after == record["temperature"]
    assert not (fold / ".nnunet_mbls.lock").exists()
