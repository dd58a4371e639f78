"""Hand-made folders: ``evaluate`` inputs (ref/ .nii.gz labels and pred/ .npz probabilities with a dataset.json
beside), a trained fold (:func:`make_fold`, the one fold builder) with validation probabilities and a checkpoint
with nnU-Net's head (:func:`fake_checkpoint`, the one fake checkpoint), and the ways to break a calibrated fold."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk
import torch

from helpers.probabilities import BOX_CLASSES, BOX_SHAPE, box_case


def write_seg(path: Path, labels: np.ndarray) -> None:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing((1.0, 1.5, 2.0))
    sitk.WriteImage(image, str(path))


def write_probs(path: Path, probs: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, probabilities=probs)


def label_names(num_classes: int) -> dict[str, int]:
    """dataset.json labels of ``num_classes`` classes: background, a, b, ..."""
    return {"background": 0, **{chr(ord("a") + k - 1): k for k in range(1, num_classes)}}


def write_eval_folders(root: Path, cases: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[Path, Path]:
    """``case_{i}`` of ``cases`` ((labels, probabilities) pairs, made in order) into root/ref and root/pred."""
    ref, pred = root / "ref", root / "pred"
    ref.mkdir(parents=True)
    pred.mkdir()
    n_cases = 0
    for n_cases, (labels, probs) in enumerate(cases, start=1):
        write_seg(ref / f"case_{n_cases - 1}.nii.gz", labels)
        write_probs(pred / f"case_{n_cases - 1}.npz", probs)
    (root / "dataset.json").write_text(json.dumps(
        {"labels": label_names(num_classes), "channel_names": {"0": "x"}, "file_ending": ".nii.gz",
         "numTraining": n_cases}))
    return ref, pred


def fake_checkpoint(path: Path, num_classes: int = 3, channels: int = 8, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> Path:
    """A checkpoint holding nnU-Net's segmentation head only (``decoder.seg_layers.0``, a 1x1x1 convolution from
    ``channels`` to ``num_classes``): freshly initialised, or the given ``weight`` and ``bias``."""
    if weight is None or bias is None:
        head = torch.nn.Conv3d(channels, num_classes, 1)
        weight, bias = head.weight.detach(), head.bias.detach()
    torch.save({"network_weights": {"decoder.seg_layers.0.weight": weight, "decoder.seg_layers.0.bias": bias}}, path)
    return path


def make_fold(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], val_cases: list[str],
              checkpoint: bool = True, num_classes: int = 3, dataset: str = "Dataset777_Hand") -> Path:
    """A hand-made trained fold: <results>/<dataset>/Tr__nnUNetPlans__3d_fullres/fold_0 with validation
    .npz files of ``cases`` (name -> (labels, probabilities); probabilities None: no .npz), gt_segmentations,
    splits_final.json (fold 0 validates ``val_cases``) and, with ``checkpoint``, a :func:`fake_checkpoint`."""
    gt = root / "preprocessed" / dataset / "gt_segmentations"
    gt.mkdir(parents=True)
    (root / "preprocessed" / dataset / "splits_final.json").write_text(
        json.dumps([{"train": [], "val": val_cases}]))
    fold = root / "results" / dataset / "Tr__nnUNetPlans__3d_fullres" / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold.parent / "dataset.json").write_text(json.dumps(
        {"labels": label_names(num_classes), "channel_names": {"0": "x"}, "file_ending": ".nii.gz",
         "numTraining": len(cases)}))
    for name, (labels, probs) in cases.items():
        write_seg(gt / f"{name}.nii.gz", labels)
        if probs is not None:
            write_probs(fold / "validation" / f"{name}.npz", probs)
    if checkpoint:
        fake_checkpoint(fold / "checkpoint_final.pth", num_classes)
    return fold


def _box_extras(pred: Path, plans_folder: Path) -> None:
    with open(pred / "case_1.pkl", "wb") as f:  # nnU-Net's crop box (no transpose here): not every voxel is "all"
        pickle.dump({"bbox_used_for_cropping": [[1, 9], [0, 14], [2, 12]], "shape_before_cropping": BOX_SHAPE,
                     "spacing": [2.0, 1.5, 1.0]}, f)
    (plans_folder / "plans.json").write_text(json.dumps({"transpose_forward": [0, 1, 2]}))


def make_box_folders(root: Path, n_cases: int = 5, seed: int = 0) -> tuple[Path, Path]:
    """ref/ (.nii.gz) and pred/ (.npz + .pkl with a crop box for one case) of cases of nested boxes, with a
    dataset.json and a plans.json beside."""
    rng = np.random.default_rng(seed)
    ref, pred = write_eval_folders(root, (box_case(rng) for _ in range(n_cases)), BOX_CLASSES)
    _box_extras(pred, root)
    return ref, pred


def make_box_fold(root: Path, n_cases: int = 6) -> Path:
    """The cases of :func:`make_box_folders` (seed 0) as a trained fold (3D, 4 classes), every case validated."""
    rng = np.random.default_rng(0)
    cases = {f"case_{i}": box_case(rng) for i in range(n_cases)}
    fold = make_fold(root, cases, list(cases), num_classes=BOX_CLASSES, dataset="Dataset779_Parallel")
    _box_extras(fold / "validation", fold.parent)
    return fold


def digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


#: ways to break a calibrated fold (:func:`make_fold`, calibrated), each of which "is calibrated" must notice
BREAKS = {
    "calibrated checkpoint deleted": lambda f: (f / "checkpoint_final_calibrated.pth").unlink(),
    "calibrated checkpoint truncated": lambda f: truncate(f / "checkpoint_final_calibrated.pth"),
    "calibrated checkpoint not a torch file": lambda f: (f / "checkpoint_final_calibrated.pth").write_text("hello"),
    "calibration.json cut in half": lambda f: truncate(f / "calibration.json"),
    "calibration.json holds another T": lambda f: (f / "calibration.json").write_text(json.dumps(
        dict(json.loads((f / "calibration.json").read_text()), checkpoint_temperature=0.5248))),
    "checkpoint_final.pth retrained": lambda f: fake_checkpoint(
        f / "checkpoint_final.pth", weight=torch.ones(3, 8, 1, 1, 1), bias=torch.zeros(3)),
}
