"""Write nnU-Net v2 raw datasets: folder naming, cases, ``dataset.json``.

Layout written (what ``nnUNetv2_plan_and_preprocess`` reads)::

    <raw_root>/DatasetXXX_Name/dataset.json
    <raw_root>/DatasetXXX_Name/imagesTr/case_XXXX_0000.nii.gz
    <raw_root>/DatasetXXX_Name/labelsTr/case_XXXX.nii.gz

A dataset is built in a hidden staging folder next to its final place and renamed into place
only when complete, so an interrupted build never leaves a half dataset that nnU-Net would find.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_mbls.io import atomic_write, atomic_write_json

FILE_ENDING = ".nii.gz"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def validate_dataset_id(dataset_id: int) -> int:
    """Return ``dataset_id`` if it is an int in 1..999 (nnU-Net's three-digit ids), else raise ValueError."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id={dataset_id!r} is invalid: nnU-Net dataset ids are integers 1..999; "
                         f"pass e.g. dataset_id=990")
    return int(dataset_id)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` for a validated id and name (letters, digits, ``_``, ``-``; no spaces or slashes)."""
    dataset_id = validate_dataset_id(dataset_id)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name={name!r} is invalid: use letters, digits, '_' or '-' (starting with a letter or "
                         f"digit), e.g. name='MbLSSynthetic'")
    return f"Dataset{dataset_id:03d}_{name}"


def validate_positive_int(argname: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``; else ValueError naming ``argname``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{argname}={value!r} is invalid: pass an integer >= {minimum}")
    return int(value)


def validate_names(argname: str, values: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """Return ``values`` as a tuple if it is a non-empty sequence of distinct names from ``known``."""
    if (isinstance(values, str) or not isinstance(values, Sequence) or not values
            or len(set(values)) != len(values) or any(v not in known for v in values)):
        raise ValueError(f"{argname}={values!r} is invalid: pass a non-empty list of distinct names from "
                         f"{list(known)}")
    return tuple(values)


def _check_target(raw_root: Path, folder_name: str, overwrite: bool) -> Path:
    """Refuse a non-empty existing dataset folder (unless ``overwrite``) and any other folder with the same id."""
    target = raw_root / folder_name
    prefix = folder_name.split("_", 1)[0] + "_"
    if raw_root.is_dir():
        clashes = sorted(p.name for p in raw_root.iterdir() if p.is_dir() and p.name.startswith(prefix)
                         and p.name != folder_name)
        if clashes:
            raise FileExistsError(f"{raw_root / clashes[0]} already uses the id of {folder_name}; nnU-Net cannot "
                                  f"tell them apart. Pick another dataset_id or remove that folder.")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"dataset folder {target} exists and is not empty; pass overwrite=True to replace "
                              f"it, or choose another dataset_id/raw_root")
    return target


def _apply_default_permissions(folder: Path) -> None:
    """Give a staged tree (created 0700/0600 by ``tempfile``) the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


@contextmanager
def new_dataset_folder(raw_root: str | os.PathLike, dataset_id: int, name: str,
                       overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder to write a dataset into; on success it becomes ``raw_root/DatasetXXX_Name``.

    Raises FileExistsError (before anything is written) when the dataset folder exists and is not empty
    and ``overwrite`` is False, or when another folder already uses the same dataset id. On any error
    inside the block the staging folder is deleted and an existing dataset is left untouched.
    """
    with staged_folder(raw_root, dataset_folder_name(dataset_id, name), overwrite, ("imagesTr", "labelsTr")) as staging:
        yield staging


@contextmanager
def staged_folder(root: str | os.PathLike, folder_name: str, overwrite: bool,
                  subfolders: Sequence[str]) -> Iterator[Path]:
    """Yield a hidden staging folder (with ``subfolders``) that becomes ``root/folder_name`` on success.

    ``folder_name`` is ``<Prefix><id>_<Name>`` (nnU-Net's ``DatasetXXX_Name``, MSD's ``TaskNN_Name``); another
    folder with the same ``<Prefix><id>_`` is refused, as is a non-empty target unless ``overwrite``.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root={root!r} is invalid: pass the output folder (e.g. nnUNet_raw) as a str or Path")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root={str(root)!r} is a file, not a folder: pass the output folder (e.g. nnUNet_raw)")
    target = _check_target(root, folder_name, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".staging", dir=root))
    try:
        for sub in subfolders:
            (staging / sub).mkdir()
        yield staging
        _apply_default_permissions(staging)
        _check_target(root, folder_name, overwrite)  # something may have appeared meanwhile
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def case_identifier(index: int) -> str:
    """``case_XXXX`` for a 0-based case index."""
    return f"case_{index:04d}"


def _to_sitk(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float] | None,
             direction: Sequence[float] | None) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing[::-1]])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    return img


def write_case(folder: str | os.PathLike, case_id: str, image: np.ndarray | Sequence[np.ndarray], labels: np.ndarray,
               spacing: Sequence[float], origin: Sequence[float] | None = None,
               direction: Sequence[float] | None = None) -> tuple[list[Path], Path]:
    """Write one training case into a dataset folder.

    ``image`` (one channel) or a list of images (one per input channel, written as ``_0000``, ``_0001``, ...)
    and ``labels`` are numpy arrays in SimpleITK order (z, y, x), same shape, 3-D; 2-D data is written as
    (1, y, x), the way nnU-Net's ``2d`` configuration reads NIfTI. ``spacing`` is in the same (z, y, x)
    order, in mm; ``origin`` (x, y, z) and ``direction`` (9 floats, row-major) as SimpleITK takes them,
    defaulting to 0 and identity. Labels are stored as uint8. Returns (image paths, label path).
    """
    channels = [np.asarray(c) for c in image] if isinstance(image, (list, tuple)) else [np.asarray(image)]
    labels = np.asarray(labels)
    if not channels or any(c.ndim != 3 or c.shape != labels.shape for c in channels):
        raise ValueError(f"image shapes {[c.shape for c in channels]} / labels shape {labels.shape} are invalid: pass "
                         f"3-D arrays of equal shape (z, y, x), one per channel; write 2-D data as shape (1, y, x)")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={tuple(spacing)!r} is invalid: pass three positive mm values in (z, y, x) order")
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"labels range {labels.min()}..{labels.max()} is invalid: labels must fit in 0..255")
    folder = Path(folder)
    img_paths = [folder / "imagesTr" / f"{case_id}_{k:04d}{FILE_ENDING}" for k in range(len(channels))]
    lab_path = folder / "labelsTr" / f"{case_id}{FILE_ENDING}"
    for path, channel in zip(img_paths, channels):
        write_nifti(path, _to_sitk(channel, spacing, origin, direction))
    write_nifti(lab_path, _to_sitk(labels.astype(np.uint8), spacing, origin, direction))
    return img_paths, lab_path


def write_nifti(path: Path, image: sitk.Image) -> Path:
    """Write a SimpleITK image to ``path`` (.nii.gz, compressed) atomically."""
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))


def write_dataset_json(folder: str | os.PathLike, channel_names: Mapping[str, str], labels: Mapping[str, int],
                       num_training: int, **extra: object) -> Path:
    """Write ``dataset.json`` (nnU-Net v2 format, file ending ``.nii.gz``).

    ``labels`` maps names to integers: ``"background"`` must be 0, the others consecutive; an
    ``"ignore"`` label, when present, must be the highest value (nnU-Net requires both).
    ``extra`` keys (e.g. ``name``, ``description``, ``reference``, ``licence``) are stored as given.
    """
    values = sorted(labels.values())
    if labels.get("background") != 0 or values != list(range(len(values))):
        raise ValueError(f"labels={dict(labels)!r} is invalid: need 'background': 0 and consecutive integers")
    if "ignore" in labels and labels["ignore"] != values[-1]:
        raise ValueError(f"labels={dict(labels)!r} is invalid: 'ignore' must have the highest label value")
    content = {"channel_names": dict(channel_names), "labels": dict(labels),
               "numTraining": validate_positive_int("num_training", num_training), "file_ending": FILE_ENDING}
    content.update(extra)
    return atomic_write_json(Path(folder) / "dataset.json", content)
