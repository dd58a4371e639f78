"""nnunet_mbls.calibration.folds.state: whether a fold is calibrated is read from its files, not their times
(issue 17)."""

from __future__ import annotations

import os

import pytest

from helpers.folders import BREAKS


@pytest.mark.parametrize("kind", list(BREAKS))
def test_is_calibrated_reads_the_files_not_their_times(calibrated_fold, kind):
    from nnunet_mbls.calibration.folds import calibration_problem

    fold, _ = calibrated_fold
    assert calibration_problem(fold) is None
    BREAKS[kind](fold)
    os.utime(fold / "checkpoint_final.pth", (0, 0))  # the old rule (mtimes) would call every one of these current
    assert calibration_problem(fold) is not None
