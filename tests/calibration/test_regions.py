"""nnunet_mbls.calibration.regions: the evaluation regions (fg, all, boundary) on a 6 x 7 label image checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mbls.calibration import region_mask


LABELS = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 9],
        [0, 0, 0, 0, 0, 0, 9],
        [0, 0, 0, 0, 0, 0, 0],
        [2, 0, 0, 0, 0, 0, 0],
    ]
)


def grid(rows: str) -> np.ndarray:
    return np.array([[c == "x" for c in row.split()] for row in rows.strip().splitlines()])


def test_region_fg_and_all_with_crop_box():
    fg = region_mask(LABELS, "fg", ignore_label=9)
    assert fg.dtype == bool and fg.shape == LABELS.shape
    assert np.array_equal(fg, np.isin(LABELS, [1, 2]))
    assert region_mask(LABELS, "fg").sum() == 7  # without ignore_label, 9 counts as foreground
    box = region_mask(LABELS, "all", ignore_label=9, crop_bbox=[[0, 5], [1, 7]])
    expected = grid(
        """
        . x x x x x x
        . x x x x x x
        . x x x x x .
        . x x x x x .
        . x x x x x x
        . . . . . . .
        """
    )
    assert np.array_equal(box, expected)
    assert region_mask(LABELS, "all").all()


def test_region_boundary_band_hand_checked():
    width1 = grid(
        """
        x x x x . . .
        x x x x . . .
        x x x x . . .
        x x x x . . .
        x x . . . . .
        x x . . . . .
        """
    )
    width2 = grid(
        """
        x x x x x . .
        x x x x x . .
        x x x x x . .
        x x x x x . .
        x x x x x . .
        x x x . . . .
        """
    )
    # the ignore voxels (label 9) neither belong to the band nor make their neighbours a boundary
    assert np.array_equal(region_mask(LABELS, "boundary", ignore_label=9, boundary_width=1), width1)
    assert np.array_equal(region_mask(LABELS, "boundary", ignore_label=9), width2)
    no_ignore = region_mask(LABELS, "boundary", boundary_width=1)
    assert no_ignore[1, 5] and no_ignore[2, 6]  # treated as a label, 9 would create a boundary


def test_region_tensor_input_3d_and_errors():
    labels = torch.zeros(3, 4, 5, dtype=torch.int16)
    labels[1, 1:3, 1:4] = 1
    band = region_mask(labels, "boundary", boundary_width=1)
    assert isinstance(band, torch.Tensor) and band.dtype == torch.bool
    assert int(band.sum()) == 3 * 4 * 5  # every voxel is within one voxel of the small block
    assert torch.equal(region_mask(labels, "fg"), labels != 0)
    assert not region_mask(torch.ones(3, 4, 5, dtype=torch.long), "boundary").any()  # the image border is no boundary
    with pytest.raises(ValueError, match="fg, all, boundary"):
        region_mask(LABELS, "foreground")
    with pytest.raises(ValueError, match="crop_bbox"):
        region_mask(LABELS, "all", crop_bbox=[[0, 9], [0, 7]])
    with pytest.raises(ValueError, match="boundary_width"):
        region_mask(LABELS, "boundary", boundary_width=0)
