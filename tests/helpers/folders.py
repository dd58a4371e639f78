"""Hand-made folders: ``evaluate`` inputs (ref/ .nii.gz labels and pred/ .npz probabilities with a dataset.json
beside) and a trained fold (:func:`make_fold`) with validation probabilities and a checkpoint with nnU-Net's head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk
import torch


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


def make_fold(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], val_cases: list[str],
              checkpoint: bool = True) -> Path:
    """A hand-made trained fold: <results>/Dataset777_Hand/Tr__nnUNetPlans__3d_fullres/fold_0 with validation
    .npz files of ``cases`` (name -> (labels, probabilities)), gt_segmentations and splits_final.json."""
    dataset = "Dataset777_Hand"
    gt = root / "preprocessed" / dataset / "gt_segmentations"
    gt.mkdir(parents=True)
    (root / "preprocessed" / dataset / "splits_final.json").write_text(
        json.dumps([{"train": [], "val": val_cases}]))
    fold = root / "results" / dataset / "Tr__nnUNetPlans__3d_fullres" / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold.parent / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "x"}, "file_ending": ".nii.gz",
         "numTraining": len(cases)}))
    for name, (labels, probs) in cases.items():
        write_seg(gt / f"{name}.nii.gz", labels)
        if probs is not None:
            write_probs(fold / "validation" / f"{name}.npz", probs)
    if checkpoint:
        head = torch.nn.Conv3d(8, 3, 1)
        torch.save({"network_weights": {"decoder.seg_layers.0.weight": head.weight.detach(),
                                        "decoder.seg_layers.0.bias": head.bias.detach()}},
                   fold / "checkpoint_final.pth")
    return fold
