"""nnunet_mbls.inference.maps: ``nnunet-mbls maps`` on bad probabilities leaves its output as it was, and killed
mid-run then rerun leaves only complete case files (issue 17)."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers.cli import one_error_line, run_cli
from helpers.folders import digest, write_probs, write_seg
from helpers.nnunet import BIN
from helpers.probabilities import SHAPE, sample_cases


def _maps_folder(tmp_path: Path, n: int = 3, shape=SHAPE) -> Path:
    """A hand-made nnUNetv2_predict --save_probabilities folder: .npz, .pkl, segmentation, dataset.json."""
    src = tmp_path / "pred"
    src.mkdir()
    for i, (_, probs) in enumerate(sample_cases(n, shape=shape)):
        write_probs(src / f"case_{i:03d}.npz", probs)
        write_seg(src / f"case_{i:03d}.nii.gz", probs.argmax(0))
        with open(src / f"case_{i:03d}.pkl", "wb") as f:
            pickle.dump({"spacing": [2.0, 1.5, 1.0]}, f)
    (src / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                 "channel_names": {"0": "x"}, "file_ending": ".nii.gz"}))
    return src


def _bad(p: np.ndarray, kind: str) -> np.ndarray:
    p = p.copy()
    if kind == "NaN":
        p[1, 0, 0, 0] = np.nan
    elif kind == "negative":
        p[1, 0, 0, 0] = -0.2
    elif kind == "unnormalised":
        p *= 1.5
    elif kind == "channels":
        p = np.concatenate([p, p[:1] * 0], 0)
    elif kind == "shape":
        p = p[:, :-1]
    return p


@pytest.mark.parametrize("kind, fragment", [("NaN", "NaN"), ("negative", "outside [0, 1]"),
                                            ("unnormalised", "outside [0, 1]"), ("channels", "4 channels"),
                                            ("shape", "spatial shape (3, 6, 5)")])
def test_maps_bad_probabilities_leave_the_output_as_it_was(tmp_path, kind, fragment):
    src = _maps_folder(tmp_path)
    out = tmp_path / "out"
    assert run_cli("maps", "-i", str(src), "-o", str(out)).returncode == 0
    before = digest(out)
    with np.load(src / "case_002.npz") as data:
        write_probs(src / "case_002.npz", _bad(data["probabilities"], kind))  # the last case: the others were fine
    line = one_error_line(run_cli("maps", "-i", str(src), "-o", str(out), "-t", "2"), "maps")
    assert "case_002" in line and fragment in line, line
    assert digest(out) == before


def test_maps_bad_case_into_a_new_folder_creates_nothing(tmp_path):
    src = _maps_folder(tmp_path)
    with np.load(src / "case_001.npz") as data:
        write_probs(src / "case_001.npz", _bad(data["probabilities"], "NaN"))
    one_error_line(run_cli("maps", "-i", str(src), "-o", str(tmp_path / "new" / "deeper")), "maps")
    assert not (tmp_path / "new").exists()


def test_sigkill_during_maps_then_rerun_leaves_only_complete_case_files(tmp_path):
    src = _maps_folder(tmp_path, n=24, shape=(12, 16, 14))
    out = tmp_path / "out"
    maps = out / "maps"
    maps.mkdir(parents=True)
    (maps / ".c067.nii.gz.hr9opd6i.nii.gz").write_bytes(b"")  # a 0.2 leftover, as reported
    proc = subprocess.Popen([str(BIN / "nnunet-mbls"), "maps", "-i", str(src), "-o", str(out), "--maps",
                             "probabilities", "confidence", "entropy"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".nnunet_mbls-partial.") for p in out.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # a random point of the case loop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in maps.glob("case_*"):  # killed while moving staged files into place: each one is complete
        sitk.ReadImage(str(path))
    rerun = run_cli("maps", "-i", str(src), "-o", str(out), "--maps", "probabilities", "confidence", "entropy")
    assert rerun.returncode == 0, rerun.stderr
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    cases = [f"case_{i:03d}" for i in range(24)]
    expected = sorted(["maps", "qc.csv", "qc.json"] + [f"maps/{c}_{s}.nii.gz" for c in cases
                                                       for s in ("prob_a", "prob_b", "confidence", "entropy")])
    assert names == expected
    for path in maps.iterdir():
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == (14, 16, 12)
    assert len(json.loads((out / "qc.json").read_text())["cases"]) == 24
