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
    """Validate an nnU-Net dataset id (nnU-Net's three-digit ids).

    Args:
        dataset_id: the id (a Python or numpy integer; bool is refused).

    Returns:
        ``dataset_id`` as an int.

    Raises:
        ValueError: ``dataset_id`` is not an integer in 1..999.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id={dataset_id!r} is invalid: nnU-Net dataset ids are integers 1..999; "
                         f"pass e.g. dataset_id=990")
    return int(dataset_id)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` for a validated id and name.

    Args:
        dataset_id: an integer in 1..999.
        name: letters, digits, ``_``, ``-`` (starting with a letter or digit; no spaces or slashes).

    Returns:
        ``Dataset{dataset_id:03d}_{name}``.

    Raises:
        ValueError: a bad ``dataset_id`` or ``name``.
    """
    dataset_id = validate_dataset_id(dataset_id)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name={name!r} is invalid: use letters, digits, '_' or '-' (starting with a letter or "
                         f"digit), e.g. name='MbLSSynthetic'")
    return f"Dataset{dataset_id:03d}_{name}"


def validate_positive_int(argname: str, value: int, minimum: int = 1) -> int:
    """Validate an integer argument with a lower bound.

    Args:
        argname: the argument's name, for the message.
        value: the value (a Python or numpy integer; bool is refused).
        minimum: the smallest accepted value (default 1).

    Returns:
        ``value`` as an int.

    Raises:
        ValueError: naming ``argname`` unless ``value`` is an integer >= ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{argname}={value!r} is invalid: pass an integer >= {minimum}")
    return int(value)


def validate_names(argname: str, values: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """Validate a selection of names (e.g. the structures of a dataset).

    Args:
        argname: the argument's name, for the message.
        values: the names chosen (a sequence, not a single string).
        known: the names that may be chosen.

    Returns:
        ``values`` as a tuple, in the given order.

    Raises:
        ValueError: naming ``argname`` and ``known`` unless ``values`` is a non-empty sequence of distinct
            names from ``known``.
    """
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

    On any error inside the block the staging folder is deleted and an existing dataset is left untouched.

    Args:
        raw_root: the nnU-Net raw folder (created if needed).
        dataset_id: an integer in 1..999.
        name: the dataset name (see :func:`dataset_folder_name`).
        overwrite: replace an existing non-empty dataset folder (default False).

    Yields:
        The staging folder, with empty ``imagesTr`` and ``labelsTr``.

    Raises:
        FileExistsError: (before anything is written) the dataset folder exists and is not empty and
            ``overwrite`` is False, or another folder already uses the same dataset id.
        ValueError: a bad ``dataset_id`` or ``name``, or ``raw_root`` is not a folder path.
    """
    with staged_folder(raw_root, dataset_folder_name(dataset_id, name), overwrite, ("imagesTr", "labelsTr")) as staging:
        yield staging


@contextmanager
def staged_folder(root: str | os.PathLike, folder_name: str, overwrite: bool,
                  subfolders: Sequence[str]) -> Iterator[Path]:
    """Yield a hidden staging folder (with ``subfolders``) that becomes ``root/folder_name`` on success.

    The target is checked again before the rename (something may have appeared meanwhile); on any error the
    staging folder is deleted.

    Args:
        root: the folder to write into (created if needed), a str or path.
        folder_name: ``<Prefix><id>_<Name>`` (nnU-Net's ``DatasetXXX_Name``, MSD's ``TaskNN_Name``).
        overwrite: replace an existing non-empty target.
        subfolders: subfolders created empty in the staging folder.

    Yields:
        The staging folder (hidden, in ``root``).

    Raises:
        ValueError: ``root`` is not a str/path, or is a file.
        FileExistsError: another folder with the same ``<Prefix><id>_`` exists, or the target is non-empty
            and ``overwrite`` is False.
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
    """``case_XXXX`` for a 0-based case index (zero-padded to four digits)."""
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
    """Write one training case into a dataset folder (each file atomically, compressed NIfTI).

    Args:
        folder: the dataset (or staging) folder with ``imagesTr`` and ``labelsTr``.
        case_id: the case identifier, e.g. from :func:`case_identifier`.
        image: one (z, y, x) array (one channel) or a list of them (one per input channel, written as
            ``_0000``, ``_0001``, ...), numpy in SimpleITK order, 3-D; 2-D data is written as (1, y, x), the
            way nnU-Net's ``2d`` configuration reads NIfTI.
        labels: (z, y, x) label map of the same shape, values 0..255; stored as uint8.
        spacing: three positive values in mm, in the same (z, y, x) order.
        origin: (x, y, z) as SimpleITK takes it; None (default) for 0.
        direction: 9 floats, row-major, as SimpleITK takes them; None (default) for identity.

    Returns:
        (image paths, label path).

    Raises:
        ValueError: no image, arrays that are not 3-D or differ in shape, ``spacing`` not three positive
            values, or labels outside 0..255.
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
    """Write a SimpleITK image to ``path`` (.nii.gz, compressed) atomically.

    Args:
        path: the destination file; its ending picks the format.
        image: the image to write.

    Returns:
        ``path``.

    Raises:
        OSError: as :func:`~nnunet_mbls.io.atomic_write`.
    """
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))


def write_dataset_json(folder: str | os.PathLike, channel_names: Mapping[str, str], labels: Mapping[str, int],
                       num_training: int, **extra: object) -> Path:
    """Write ``dataset.json`` (nnU-Net v2 format, file ending ``.nii.gz``) atomically.

    Args:
        folder: the dataset (or staging) folder.
        channel_names: channel index (as a string) -> name, e.g. ``{"0": "MRI"}``.
        labels: names -> integers: ``"background"`` must be 0, the others consecutive; an ``"ignore"`` label,
            when present, must be the highest value (nnU-Net requires both).
        num_training: number of training cases, >= 1.
        **extra: keys (e.g. ``name``, ``description``, ``reference``, ``licence``) stored as given.

    Returns:
        The path of ``dataset.json``.

    Raises:
        ValueError: ``labels`` breaks the rules above, or ``num_training`` is not an integer >= 1.
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
