"""nnunet_mbls.calibration.files: ``apply-temperature`` on bad probability files or a bad calibration.json writes
nothing and names the file, and the rerun after the repair works (issue 17)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers.cli import one_error_line, run_cli
from helpers.folders import truncate, write_probs
from helpers.probabilities import SHAPE, sample_cases


def _apply_folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i, (_, probs) in enumerate(sample_cases(3)):
        write_probs(src / f"case_{i}.npz", probs)
        with open(src / f"case_{i}.pkl", "wb") as f:
            pickle.dump({"spacing": [1.0, 1.0, 1.0]}, f)
    return src


APPLY_BREAKS = {
    "truncated npz": (lambda src: truncate(src / "case_1.npz"), ["case_1", "case_1.npz", "cannot read"]),
    "wrong key": (lambda src: np.savez(src / "case_1.npz", logits=np.zeros((3,) + SHAPE)), ["no 'probabilities'"]),
    "not summing to 1": (lambda src: write_probs(src / "case_1.npz", np.full((3,) + SHAPE, 0.5, np.float32)),
                         ["case_1", "do not sum to 1"]),
}


@pytest.mark.parametrize("kind", list(APPLY_BREAKS))
def test_apply_temperature_bad_npz_writes_nothing_and_the_rerun_after_repair_works(tmp_path, kind):
    src = _apply_folder(tmp_path)
    good = (src / "case_1.npz").read_bytes()
    breaks, fragments = APPLY_BREAKS[kind]
    breaks(src)
    out = tmp_path / "out"
    line = one_error_line(run_cli("apply-temperature", "-i", str(src), "-o", str(out), "-t", "1.5"), "apply-temperature")
    assert all(f in line for f in fragments), line
    assert not out.exists()
    (src / "case_1.npz").write_bytes(good)
    assert run_cli("apply-temperature", "-i", str(src), "-o", str(out), "-t", "1.5").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    with np.load(out / "case_1.npz") as data, np.load(src / "case_1.npz") as raw:
        p = raw["probabilities"].astype(np.float64) ** (1 / 1.5)
        np.testing.assert_allclose(data["probabilities"], p / p.sum(0), rtol=1e-5)


@pytest.mark.parametrize("content, fragment", [("{}", "holds no 'temperature'"), ("{not json", "cannot be read as JSON"),
                                               ('{"temperature": "1.5"}', "temperature '1.5' is invalid"),
                                               ('{"temperature": -2}', "temperature -2 is invalid")])
def test_apply_temperature_bad_calibration_json_names_the_file(tmp_path, content, fragment):
    src = _apply_folder(tmp_path)
    record = tmp_path / "calibration.json"
    record.write_text(content)
    line = one_error_line(run_cli("apply-temperature", "-i", str(src), "-o", str(tmp_path / "out"),
                                "--calibration-json", str(record)), "apply-temperature")
    assert fragment in line and str(record) in line, line
    assert not (tmp_path / "out").exists()
