"""Medical Segmentation Decathlon (MSD) layout, the input of nnU-Net's ``nnUNetv2_convert_MSD_dataset``.

``TaskNN_Name/``: ``imagesTr/`` and ``imagesTs/`` hold one NIfTI per case, 4D (x, y, z, channel) when the task
has several channels and 3D otherwise; ``labelsTr/`` the 3D label maps; ``dataset.json`` MSD's keys
(``modality``, ``labels`` as value -> name, ``training`` image/label pairs, ``test`` image paths). Files are
named ``<name in lower case>_NNN.nii.gz`` as in the Decathlon's own tasks.

:func:`write_msd_task` turns a raw nnU-Net dataset made by our generators into that layout, so every
dataset kind can take the MSD route; its last ``num_test`` cases become the unlabelled test images.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import SimpleITK as sitk

from nnunet_mbls.data.raw_dataset import FILE_ENDING, staged_folder, validate_positive_int, write_nifti
from nnunet_mbls.io import atomic_write_json

_MSD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")


def task_folder_name(task_id: int, name: str) -> str:
    """The MSD task folder name ``TaskNN_Name``.

    nnU-Net's converter splits the folder name at its one underscore, so Name has none.

    Args:
        task_id: an integer >= 1 (two digits at least).
        name: letters, digits or ``-``, starting with a letter or digit; no ``_``.

    Returns:
        ``Task{task_id:02d}_{name}``.

    Raises:
        ValueError: ``task_id`` is not an integer >= 1, or ``name`` does not fit.
    """
    validate_positive_int("task_id", task_id)
    if not isinstance(name, str) or not _MSD_NAME.match(name):
        raise ValueError(f"name={name!r} is invalid for the MSD layout: use letters, digits or '-' and no '_' "
                         f"(nnUNetv2_convert_MSD_dataset splits TaskNN_Name at its only underscore)")
    return f"Task{task_id:02d}_{name}"


def _msd_image(channel_files: list[Path]) -> sitk.Image:
    """One 3D image per channel -> one image: 3D for one channel, else 4D with the channel as 4th axis."""
    images = [sitk.ReadImage(str(f)) for f in channel_files]
    return images[0] if len(images) == 1 else sitk.JoinSeries(images)


def write_msd_task(nnunet_folder: str | os.PathLike, out_root: str | os.PathLike, task_id: int, name: str,
                   num_test: int = 0, overwrite: bool = False) -> Path:
    """Write ``out_root/TaskNN_Name`` from the raw nnU-Net dataset ``nnunet_folder``; return the task folder.

    The cases are taken in sorted order; the last ``num_test`` go to ``imagesTs`` without labels, the others
    to ``imagesTr``/``labelsTr``. Channel names become MSD's ``modality``. Staged and renamed into place, so
    an interrupted run leaves no half task.

    Args:
        nnunet_folder: a raw nnU-Net dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        out_root: the folder to write the task folder into.
        task_id: MSD task id, >= 1.
        name: task name (see :func:`task_folder_name`).
        num_test: number of cases (the last ones) written as unlabelled test images (default 0).
        overwrite: replace an existing non-empty task folder (default False).

    Returns:
        The task folder ``out_root/TaskNN_Name``.

    Raises:
        ValueError: ``num_test`` is negative or leaves no training case; bad ``task_id`` or ``name``;
            ``out_root`` is a file.
        FileExistsError: an existing non-empty task folder without ``overwrite``, or another folder with the
            same ``TaskNN_`` prefix.
    """
    source = Path(nnunet_folder)
    meta = json.loads((source / "dataset.json").read_text())
    cases = sorted(p.name[: -len(FILE_ENDING)] for p in (source / "labelsTr").glob(f"*{FILE_ENDING}"))
    validate_positive_int("num_test", num_test, minimum=0)
    if num_test >= len(cases):
        raise ValueError(f"num_test={num_test} is invalid: the dataset has {len(cases)} cases and at least one must "
                         f"stay for training; pass fewer test cases or generate more (-n)")
    channels = sorted(meta["channel_names"], key=int)
    stem = name.lower()
    training, test = [], []
    with staged_folder(out_root, task_folder_name(task_id, name), overwrite, ("imagesTr", "labelsTr", "imagesTs")) as staging:
        for index, case in enumerate(cases, start=1):
            file_name = f"{stem}_{index:03d}{FILE_ENDING}"
            is_test = index > len(cases) - num_test
            images = [source / "imagesTr" / f"{case}_{int(c):04d}{FILE_ENDING}" for c in channels]
            write_nifti(staging / ("imagesTs" if is_test else "imagesTr") / file_name, _msd_image(images))
            if is_test:
                test.append(f"./imagesTs/{file_name}")
            else:
                write_nifti(staging / "labelsTr" / file_name, sitk.ReadImage(str(source / "labelsTr" / f"{case}{FILE_ENDING}")))
                training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
        extra = {k: meta[k] for k in ("description", "reference", "licence") if k in meta}
        atomic_write_json(staging / "dataset.json", {
            "name": name, **extra, "release": "nnunet-mbls generated",
            "tensorImageSize": "4D" if len(channels) > 1 else "3D",
            "modality": {c: meta["channel_names"][c] for c in channels},
            "labels": {str(v): k for k, v in sorted(meta["labels"].items(), key=lambda kv: kv[1])},
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
        })
    return Path(out_root) / task_folder_name(task_id, name)
