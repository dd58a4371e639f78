"""Abdominal CT dataset from the example scan shipped in TotalSegmentator's source archive.

Source: the ``totalsegmentator==2.18.0`` sdist on PyPI (Apache-2.0), files
``tests/reference_files/example_ct_sm.nii.gz`` (CT, 30×101×122 voxels of 3 mm) and
``tests/reference_files/example_seg.nii.gz`` (TotalSegmentator's own multilabel prediction for it, task
"total"; label values as in ``totalsegmentator/map_to_binary.py``, ``class_map["total"]``). The labels are
MODEL-MADE, not manual. Organs are merged (left+right kidney), the scan is cropped around them, and N
cases are made by random smooth warps, small HU scale/shift changes and noise: ONE scan augmented.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_mbls.data.augment import (IntensityParams, WarpParams, merge_labels, validate_augmented_args,
                                      write_augmented_dataset)
from nnunet_mbls.data.raw_dataset import validate_names

TS_VERSION = "2.18.0"
SDIST_MEMBERS = {  # file name in the cache -> path inside the sdist (below totalsegmentator-<version>/)
    "example_ct_sm.nii.gz": "tests/reference_files/example_ct_sm.nii.gz",
    "example_seg.nii.gz": "tests/reference_files/example_seg.nii.gz",
    "map_to_binary.py": "totalsegmentator/map_to_binary.py",
}
# our structure name -> TotalSegmentator "total" class names (class_map["total"] in map_to_binary.py 2.18.0)
TOTAL_STRUCTURES = {"liver": ("liver",), "spleen": ("spleen",), "kidney": ("kidney_left", "kidney_right"),
                    "stomach": ("stomach",), "pancreas": ("pancreas",), "gallbladder": ("gallbladder",)}
TOTAL_CLASS_IDS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                   "pancreas": 7}
DEFAULT_STRUCTURES = ("liver", "spleen", "kidney", "stomach", "pancreas")


def cache_dir() -> Path:
    """``$MBLS_CACHE`` if set, else ``~/.cache/nnunet_mbls``."""
    return Path(os.environ.get("MBLS_CACHE") or Path.home() / ".cache" / "nnunet_mbls")


def download_command(dest: str | os.PathLike) -> list[str]:
    """The pip command that downloads the TotalSegmentator sdist into ``dest``.

    Args:
        dest: the download folder.

    Returns:
        The command as an argument list (this Python's ``pip download --no-deps --no-binary :all:``).
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"totalsegmentator=={TS_VERSION}", "-d", str(dest)]


def _extract(sdist: Path, dest: Path) -> None:
    """Extract only ``SDIST_MEMBERS`` from the sdist into ``dest`` (flat)."""
    root = f"totalsegmentator-{TS_VERSION}/"
    with tarfile.open(sdist, "r:gz") as tar:
        for local, member in SDIST_MEMBERS.items():
            f = tar.extractfile(root + member)
            if f is None:
                raise RuntimeError(f"{root + member} is not a file in {sdist}")
            with f, open(dest / local, "wb") as out:
                shutil.copyfileobj(f, out)


def fetch_totalseg_example(source_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding ``example_ct_sm.nii.gz`` and ``example_seg.nii.gz`` (and, when fetched, ``map_to_binary.py``).

    ``source_dir`` may be such a folder or an extracted sdist (files under ``tests/reference_files``);
    it is used as given. Otherwise ``<cache_dir()>/totalsegmentator-2.18.0`` is used, filled on first
    use by ``pip download`` of the sdist (about 38 MB, deleted after extracting three files, ~0.5 MB).

    Args:
        source_dir: a folder with the two files, or an extracted sdist; None (default) uses the cache.

    Returns:
        The folder holding the files.

    Raises:
        RuntimeError: ``source_dir`` holds neither the files nor ``tests/reference_files`` with them; or the
            download or extraction failed (naming the command to run by hand and the ``source_dir=``
            alternative).
    """
    needed = ("example_ct_sm.nii.gz", "example_seg.nii.gz")
    if source_dir is not None:
        for folder in (Path(source_dir), Path(source_dir) / "tests" / "reference_files"):
            if all((folder / f).is_file() for f in needed):
                return folder
        raise RuntimeError(f"source_dir={str(source_dir)!r} holds neither {needed} nor tests/reference_files/ "
                           f"with them; pass the folder of an extracted totalsegmentator-{TS_VERSION} sdist")
    target = cache_dir() / f"totalsegmentator-{TS_VERSION}"
    if all((target / f).is_file() for f in SDIST_MEMBERS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        cmd = download_command(tmp)
        print(f"nnunet_mbls: running {' '.join(cmd)}", flush=True)
        try:
            ok = subprocess.run(cmd).returncode == 0
            sdists = sorted(Path(tmp).glob("totalsegmentator-*.tar.gz"))
            if not (ok and sdists):
                raise RuntimeError("pip download failed")
            staging = Path(tmp) / "files"
            staging.mkdir()
            _extract(sdists[0], staging)
        except (OSError, RuntimeError, tarfile.TarError) as e:
            hand = " ".join(download_command("/tmp/ts"))
            raise RuntimeError(
                f"could not fetch the TotalSegmentator {TS_VERSION} sdist ({e}). Run by hand: `{hand}`, then "
                f"`tar xzf /tmp/ts/totalsegmentator-{TS_VERSION}.tar.gz -C /tmp/ts` and pass "
                f"source_dir='/tmp/ts/totalsegmentator-{TS_VERSION}' (or copy {list(SDIST_MEMBERS)} "
                f"from it into {target})") from e
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def read_total_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Class name -> label value of the "total" task, read (without importing) from ``map_to_binary.py``.

    Args:
        path: TotalSegmentator's ``map_to_binary.py``.

    Returns:
        Class name -> label value.

    Raises:
        RuntimeError: the file has no literal ``class_map["total"]``.
    """
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Dict):
                for key, val in zip(value.keys, value.values):
                    if isinstance(key, ast.Constant) and key.value == "total":
                        return {name: idx for idx, name in ast.literal_eval(val).items()}
    raise RuntimeError(f"no class_map['total'] found in {path}")


def make_totalseg_abdomen_dataset(raw_root: str | os.PathLike, dataset_id: int = 992, num_cases: int = 20,
                                  seed: int = 0, overwrite: bool = False,
                                  source_dir: str | os.PathLike | None = None,
                                  structures: Sequence[str] = DEFAULT_STRUCTURES, margin_mm: float = 6.0,
                                  spacing_mm: float | None = None, name: str = "MbLSTotalSegAbdomen") -> Path:
    """Write an nnU-Net raw abdominal CT dataset from TotalSegmentator's example scan; return its folder.

    Labels: background 0, then ``structures`` in the given order. Cropped to them plus ``margin_mm``.
    Channel "CT" (nnU-Net's CT normalisation); images int16 HU. See ``fetch_totalseg_example`` for the source.

    Args:
        raw_root: the nnU-Net raw folder to write into.
        dataset_id: nnU-Net dataset id (default 992).
        num_cases: number of augmented cases (default 20).
        seed: seed (default 0); case ``i`` depends only on ``(seed, i)``.
        overwrite: replace an existing non-empty dataset folder (default False).
        source_dir: the example files' folder; None (default) uses (and fills) the cache.
        structures: distinct names from :data:`TOTAL_STRUCTURES` (default liver, spleen, kidney (left+right),
            stomach, pancreas; "gallbladder" is also available).
        margin_mm: margin around the structures in mm (default 6).
        spacing_mm: output spacing in mm; None (default) keeps the source's 3 mm (about 30×71×102 voxels).
        name: dataset name (default ``MbLSTotalSegAbdomen``).

    Returns:
        The dataset folder ``raw_root/DatasetXXX_Name``.

    Raises:
        ValueError: a bad argument (structures, id, name, count, seed, spacing, margin).
        RuntimeError: the source cannot be had, its class ids differ from :data:`TOTAL_CLASS_IDS`, or the
            scan and the segmentation differ in size.
        FileExistsError: the dataset folder exists and is not empty (without ``overwrite``), or another
            folder uses the same dataset id.
    """
    structures = validate_names("structures", structures, list(TOTAL_STRUCTURES))
    validate_augmented_args(dataset_id, name, num_cases, seed, spacing_mm, margin_mm)
    folder = fetch_totalseg_example(source_dir)
    if (folder / "map_to_binary.py").is_file():
        found = read_total_class_map(folder / "map_to_binary.py")
        wrong = {k: (v, found.get(k)) for k, v in TOTAL_CLASS_IDS.items() if found.get(k) != v}
        if wrong:
            raise RuntimeError(f"TotalSegmentator class ids differ from the ones this module expects: {wrong}")
    mapping = {TOTAL_CLASS_IDS[c]: k + 1 for k, s in enumerate(structures) for c in TOTAL_STRUCTURES[s]}
    image = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    if seg.GetSize() != image.GetSize():
        raise RuntimeError(f"{folder / 'example_seg.nii.gz'} and {folder / 'example_ct_sm.nii.gz'} differ in size")
    labels = merge_labels(sitk.GetArrayFromImage(seg), mapping)
    return write_augmented_dataset(
        raw_root, dataset_id, name, image, labels, {"background": 0, **{s: k + 1 for k, s in enumerate(structures)}},
        num_cases=num_cases, seed=seed, spacing_mm=spacing_mm, margin_mm=margin_mm,
        warp_params=WarpParams(max_rotation_deg=3.0, scale_range=(0.93, 1.07), elastic_std=1.0,
                               elastic_correlation=8.0),
        intensity_params=IntensityParams(floor=-1024.0, contrast_range=(0.97, 1.03), shift_range=(-15.0, 15.0),
                                         noise_std=(5.0, 20.0)),
        channel="CT", overwrite=overwrite, out_dtype=np.int16,
        description=(f"ONE abdominal CT scan (TotalSegmentator {TS_VERSION} example_ct_sm, 3 mm) augmented into "
                     f"{num_cases} cases by random smooth warps, HU scale/shift and noise (seed={seed}). Labels "
                     f"are MODEL-MADE (TotalSegmentator's prediction example_seg.nii.gz), merged: "
                     f"{', '.join(structures)}. Not independent subjects, not manual ground truth."),
        reference=f"Wasserthal et al. 2023, TotalSegmentator; PyPI sdist totalsegmentator=={TS_VERSION}",
        licence="Apache-2.0 (TotalSegmentator repository)", source=str(folder))
