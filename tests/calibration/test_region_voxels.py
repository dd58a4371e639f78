"""The samplings behind the streamed statistics: allocation of a stratified sample, strata of voxels."""

from __future__ import annotations

import numpy as np
import torch

from nnunet_mbls.calibration.region_voxels import allocate, num_strata, stratum_of


def test_allocate_takes_small_strata_whole_and_shares_the_rest():
    np.testing.assert_array_equal(allocate(np.array([0, 3, 100, 50]), 60), [0, 3, 29, 28])
    np.testing.assert_array_equal(allocate(np.array([5, 7]), 100), [5, 7])
    assert allocate(np.array([10, 10, 10]), 7).sum() == 7


def test_strata_are_the_top_bin_split_by_half_octaves_and_correctness():
    # 15 bins: bins 0..13 are their own strata; the top bin (p > 14/15) is split by half-octaves of 1 - p from
    # 2**-3.5 (index floor(2 log2 15) = 7) to 2**-24; correct voxels come after every incorrect stratum
    probs = torch.tensor([[0.5, 0.95, 1 - 2.0**-10, 1.0], [0.5, 0.05, 2.0**-10, 0.0]], dtype=torch.float64)
    target = torch.tensor([1, 0, 0, 1])
    per_correctness = num_strata(15) // 2
    assert per_correctness == 14 + (48 - 7 + 1)
    # voxel 0: a tie, prediction = the first maximum (class 0), wrong; bin of 0.5 is 7
    # voxel 1: 0.95 -> top bin, 1 - p = 0.05 -> half-octave floor(-2 log2 0.05) = 8 -> stratum 14 + 1; correct
    # voxel 2: 1 - p = 2**-10 -> half-octave 20 -> stratum 14 + 13; correct; voxel 3: p = 1 -> the last, wrong
    expected = [7, per_correctness + 15, per_correctness + 27, 14 + 41]
    assert stratum_of(probs, target, 15).tolist() == expected
