"""Hand-made ``evaluate`` inputs: ref/ (.nii.gz labels) and pred/ (.npz probabilities) with a dataset.json beside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk


def write_seg(path: Path, labels: np.ndarray) -> None:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing((1.0, 1.5, 2.0))
    sitk.WriteImage(image, str(path))


def write_probs(path: Path, probs: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, probabilities=probs)


def write_eval_folders(root: Path, cases: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[Path, Path]:
    """``case_{i}`` of ``cases`` ((labels, probabilities) pairs, made in order) into root/ref and root/pred."""
    ref, pred = root / "ref", root / "pred"
    ref.mkdir(parents=True)
    pred.mkdir()
    n_cases = 0
    for n_cases, (labels, probs) in enumerate(cases, start=1):
        write_seg(ref / f"case_{n_cases - 1}.nii.gz", labels)
        write_probs(pred / f"case_{n_cases - 1}.npz", probs)
    names = {"background": 0, **{chr(ord("a") + k - 1): k for k in range(1, num_classes)}}
    (root / "dataset.json").write_text(json.dumps(
        {"labels": names, "channel_names": {"0": "x"}, "file_ending": ".nii.gz", "numTraining": n_cases}))
    return ref, pred
