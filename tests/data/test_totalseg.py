"""nnunet_mbls.data.totalseg: the abdomen dataset from TotalSegmentator's example, checked by nnU-Net's own
dataset check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_mbls.data.totalseg import (TOTAL_CLASS_IDS, fetch_totalseg_example, make_totalseg_abdomen_dataset,
                                       read_total_class_map)

from helpers.datasets import dataset_cases, verify_dataset


def test_totalseg_abdomen_dataset(tmp_path: Path) -> None:
    try:
        source = fetch_totalseg_example()
    except RuntimeError as e:  # only when pip could not download the sdist
        pytest.skip(f"TotalSegmentator sdist unavailable: {e}")
    assert read_total_class_map(source / "map_to_binary.py").items() >= TOTAL_CLASS_IDS.items()
    folder = make_totalseg_abdomen_dataset(tmp_path, num_cases=2)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4, "pancreas": 5}
    assert meta["channel_names"] == {"0": "CT"} and "MODEL-MADE" in meta["description"]
    for image, labels in dataset_cases(folder):
        assert image.dtype == np.int16 and -1100 < np.median(image) < 200
        assert set(np.unique(labels)) == set(range(6))
    verify_dataset(folder)
