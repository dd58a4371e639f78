"""Generated datasets: (image, labels) arrays of every case, and nnU-Net's own integrity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dataset_cases(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    labels = sorted((folder / "labelsTr").glob("*.nii.gz"))
    return [(_read(folder / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz")), _read(p)) for p in labels]


def verify_dataset(folder: Path) -> None:
    """nnU-Net's own dataset check (spawns one worker)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)
