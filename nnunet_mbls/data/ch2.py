"""Deep grey-matter dataset from real anatomy: the Colin27 ("ch2") T1 MRI with the AAL atlas labels.

Source: Debian/Ubuntu package ``mricron-data`` (``/usr/share/mricron/templates/ch2.nii.gz``,
``aal.nii.gz`` and the label names ``aal.nii.txt``, all on the same 1 mm MNI grid; AAL was drawn on
this very brain). Left and right AAL regions are merged per structure, the volume is cropped around
them, and N cases are made by random smooth warps, gamma/contrast changes, bias field and noise. It is
ONE subject augmented, not N subjects: say so when reporting results on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_mbls.data.augment import (IntensityParams, WarpParams, merge_labels, validate_augmented_args,
                                      write_augmented_dataset)
from nnunet_mbls.data.raw_dataset import validate_names

SOURCE_FILES = ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")
DEFAULT_DIRS = (Path("/usr/share/mricron/templates"), Path("/usr/share/mricron"))
INSTALL_COMMAND = "sudo apt-get install mricron-data"
# our structure name -> AAL region name stem (both hemispheres, "<stem>_L" and "<stem>_R", are merged)
AAL_STRUCTURES = {"caudate": "Caudate", "putamen": "Putamen", "pallidum": "Pallidum", "thalamus": "Thalamus",
                  "hippocampus": "Hippocampus", "amygdala": "Amygdala"}
DEFAULT_STRUCTURES = tuple(AAL_STRUCTURES)


def _has_sources(folder: Path) -> bool:
    return all((folder / f).is_file() for f in SOURCE_FILES)


def _try_apt_install() -> bool:
    """As root with apt-get: install mricron-data (running ``apt-get update`` first if needed); True on success."""
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "mricron-data"]
    print(f"nnunet_mbls: running {' '.join(install)}", flush=True)
    if subprocess.run(install, env=env).returncode == 0:
        return True
    print("nnunet_mbls: running apt-get update, then retrying", flush=True)
    return (subprocess.run(["apt-get", "update"], env=env).returncode == 0
            and subprocess.run(install, env=env).returncode == 0)


def find_mricron_dir(source_dir: str | os.PathLike | None = None, install: bool = True) -> Path:
    """Folder holding ``ch2.nii.gz``, ``aal.nii.gz`` and ``aal.nii.txt``.

    Looks in ``source_dir`` if given (nothing else), else in ``$MBLS_MRICRON_DIR`` if set, else in
    ``/usr/share/mricron/templates`` (and ``/usr/share/mricron``); when absent there and ``install`` is True,
    runs as root ``apt-get install -y mricron-data``.

    Args:
        source_dir: the folder to use; None (default) searches as above.
        install: allow the apt-get install when searching the default folders (default True).

    Returns:
        The folder holding the three files.

    Raises:
        RuntimeError: naming the paths looked at and the install command when the files cannot be had.
    """
    if source_dir is not None:
        candidates, may_install = [Path(source_dir)], False
    elif os.environ.get("MBLS_MRICRON_DIR"):
        candidates, may_install = [Path(os.environ["MBLS_MRICRON_DIR"])], False
    else:
        candidates, may_install = list(DEFAULT_DIRS), install
    for _ in range(2):
        for folder in candidates:
            if _has_sources(folder):
                return folder
        if not (may_install and _try_apt_install()):
            break
        may_install = False
    looked = ", ".join(str(c / f) for c in candidates for f in SOURCE_FILES[:1])
    raise RuntimeError(f"Colin27/AAL source files {', '.join(SOURCE_FILES)} not found (looked for {looked}). "
                       f"Install them with `{INSTALL_COMMAND}` (Debian/Ubuntu), or pass source_dir= / set "
                       f"MBLS_MRICRON_DIR to a folder that holds them.")


def read_aal_names(path: str | os.PathLike) -> dict[str, int]:
    """AAL region name -> label value, from ``aal.nii.txt``.

    Args:
        path: the ``aal.nii.txt`` file (lines ``<value> <name> <code>``; other lines are skipped).

    Returns:
        Region name (e.g. ``Caudate_L``) -> label value.
    """
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[parts[1]] = int(parts[0])
    return names


def make_ch2_deepgm_dataset(raw_root: str | os.PathLike, dataset_id: int = 991, num_cases: int = 20, seed: int = 0,
                            spacing_mm: float = 2.0, margin_mm: float = 6.0,
                            structures: Sequence[str] = DEFAULT_STRUCTURES, name: str = "MbLSCh2DeepGM",
                            overwrite: bool = False, source_dir: str | os.PathLike | None = None) -> Path:
    """Write an nnU-Net raw dataset of deep grey-matter structures from Colin27 + AAL; return its folder.

    Labels: background 0, then ``structures`` in the given order (left+right merged). Cases are cropped to
    the structures plus ``margin_mm`` and resampled to ``spacing_mm``. Channel "MRI". See
    ``find_mricron_dir`` for where the source comes from.

    Args:
        raw_root: the nnU-Net raw folder to write into.
        dataset_id: nnU-Net dataset id (default 991).
        num_cases: number of augmented cases (default 20).
        seed: seed (default 0); case ``i`` depends only on ``(seed, i)``.
        spacing_mm: output spacing in mm (default 2 mm, which gives about 34×41×47 voxels).
        margin_mm: margin around the structures in mm (default 6).
        structures: distinct names from :data:`AAL_STRUCTURES` (default caudate, putamen, pallidum, thalamus,
            hippocampus, amygdala).
        name: dataset name (default ``MbLSCh2DeepGM``).
        overwrite: replace an existing non-empty dataset folder (default False).
        source_dir: the folder with the Colin27/AAL files; None searches (see :func:`find_mricron_dir`).

    Returns:
        The dataset folder ``raw_root/DatasetXXX_Name``.

    Raises:
        ValueError: a bad argument (structures, id, name, count, seed, spacing, margin).
        RuntimeError: the source files cannot be had, or atlas and image are not on the same grid.
        FileExistsError: the dataset folder exists and is not empty (without ``overwrite``), or another
            folder uses the same dataset id.
    """
    structures = validate_names("structures", structures, list(AAL_STRUCTURES))
    validate_augmented_args(dataset_id, name, num_cases, seed, spacing_mm, margin_mm)
    folder = find_mricron_dir(source_dir)
    aal_names = read_aal_names(folder / "aal.nii.txt")
    mapping = {aal_names[f"{AAL_STRUCTURES[s]}_{side}"]: k + 1 for k, s in enumerate(structures) for side in "LR"}
    image = sitk.ReadImage(str(folder / "ch2.nii.gz"))
    atlas = sitk.ReadImage(str(folder / "aal.nii.gz"))
    if atlas.GetSize() != image.GetSize() or not np.allclose(atlas.GetSpacing(), image.GetSpacing()):
        raise RuntimeError(f"{folder / 'aal.nii.gz'} and {folder / 'ch2.nii.gz'} are not on the same grid")
    labels = merge_labels(sitk.GetArrayFromImage(atlas), mapping)
    return write_augmented_dataset(
        raw_root, dataset_id, name, image, labels, {"background": 0, **{s: k + 1 for k, s in enumerate(structures)}},
        num_cases=num_cases, seed=seed, spacing_mm=spacing_mm, margin_mm=margin_mm,
        warp_params=WarpParams(max_rotation_deg=6.0, scale_range=(0.92, 1.08), elastic_std=1.0,
                               elastic_correlation=8.0),
        intensity_params=IntensityParams(floor=0.0, gamma_range=(0.7, 1.4), contrast_range=(0.9, 1.1),
                                         bias_strength=0.15, bias_correlation=16.0, noise_std=(1.0, 4.0)),
        channel="MRI", overwrite=overwrite, out_dtype=np.float32,
        description=(f"ONE subject (Colin27 'ch2' T1, 1 mm MNI template) augmented into {num_cases} cases by "
                     f"random smooth warps, gamma/contrast changes, bias field and noise (seed={seed}). Labels: "
                     f"AAL atlas regions (drawn on this brain), left+right merged. Not independent subjects."),
        reference="Holmes et al. 1998 (Colin27); Tzourio-Mazoyer et al. 2002 (AAL); Debian package mricron-data",
        licence="see /usr/share/doc/mricron-data/copyright", source=str(folder))
