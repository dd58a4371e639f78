"""nnunet_mbls.data.ch2: the Colin27 deep grey matter dataset, checked by nnU-Net's own dataset check; missing
sources (its Colin27/AAL files, and TotalSegmentator's example) raise with instructions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mbls.data.ch2 import find_mricron_dir, make_ch2_deepgm_dataset
from nnunet_mbls.data.totalseg import fetch_totalseg_example

from helpers.datasets import dataset_cases, verify_dataset


def test_missing_sources_raise_with_instructions(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="sudo apt-get install mricron-data"):
        find_mricron_dir(tmp_path)
    with pytest.raises(RuntimeError, match="source_dir"):
        fetch_totalseg_example(tmp_path)


def test_ch2_deepgm_dataset(tmp_path: Path) -> None:
    try:
        find_mricron_dir()
    except RuntimeError as e:  # only when apt-get could not install mricron-data
        pytest.skip(f"Colin27/AAL source unavailable: {e}")
    folder = make_ch2_deepgm_dataset(tmp_path, num_cases=3)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "caudate": 1, "putamen": 2, "pallidum": 3, "thalamus": 4,
                              "hippocampus": 5, "amygdala": 6}
    assert meta["channel_names"] == {"0": "MRI"} and "ONE subject" in meta["description"]
    cases = dataset_cases(folder)
    for image, labels in cases:
        assert max(image.shape) <= 64 and image.dtype == np.float32
        assert set(np.unique(labels)) == set(range(7))
    assert not np.array_equal(cases[0][1], cases[1][1])  # warps differ
    assert sitk.ReadImage(str(folder / "labelsTr" / "case_0000.nii.gz")).GetSpacing() == (2.0, 2.0, 2.0)
    verify_dataset(folder)
