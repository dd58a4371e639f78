"""nnunet_mbls.demo: ``nnunet-mbls demo --quick`` end to end, on tiny real nnU-Net runs (CPU)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers.nnunet import BIN

pytestmark = pytest.mark.integration  # runs the demo: nnU-Net planning, training and prediction


def test_demo_quick_end_to_end(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("nnUNet_")}
    proc = subprocess.run([str(BIN / "nnunet-mbls"), "demo", "--quick", "-o", str(tmp_path / "demo"), "-device", "cpu"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "demo"
    assert (out / "nnUNet_raw" / "Dataset989_MbLSSyntheticQuick" / "dataset.json").is_file()
    results = out / "benchmark" / "Dataset989_MbLSSyntheticQuick"
    assert "| nnUNetTrainerMbLS |" in proc.stdout and "| nnUNetTrainer |" in proc.stdout
    data = json.loads((results / "results.json").read_text())
    assert set(data["rows"]) == {"nnUNetTrainer", "nnUNetTrainerMbLS"} and data["missing_cells"] == []
    for trainer in ("nnUNetTrainer", "nnUNetTrainerMbLS"):
        fold = out / "nnUNet_results" / "Dataset989_MbLSSyntheticQuick" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
        assert (fold / "checkpoint_final_calibrated.pth").is_file()
        qc = (out / "predict" / trainer / "qc.csv").read_text().splitlines()
        assert len(qc) == 1 + 2 and (out / "predict" / trainer / "maps" / f"{qc[1].split(',')[0]}_entropy.nii.gz").is_file()
