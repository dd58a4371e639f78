"""nnunet_mbls.cli.calibrate: ``--if-missing`` redoes a broken calibration (issue 17)."""

from __future__ import annotations

import pytest

from helpers.cli import run_cli
from helpers.folders import BREAKS


@pytest.mark.parametrize("kind", ["calibrated checkpoint truncated", "calibration.json cut in half"])
def test_calibrate_if_missing_redoes_a_broken_calibration(calibrated_fold, kind):
    from nnunet_mbls.calibration.folds import calibration_problem

    fold, env = calibrated_fold
    args = ("calibrate", "-d", "777", "-c", "3d_fullres", "-f", "0", "-tr", "Tr", "--if-missing", "-device", "cpu")
    first = run_cli(*args, env=env)
    assert first.returncode == 0 and "up to date" in first.stdout, first.stdout + first.stderr
    BREAKS[kind](fold)
    second = run_cli(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert "calibrating (--if-missing)" in second.stdout and "up to date" not in second.stdout
    assert calibration_problem(fold) is None
