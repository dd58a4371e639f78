"""Probability and uncertainty maps as NIfTI files in the geometry of the input image.

The geometry of every map is copied from the segmentation that nnU-Net's own reader/writer wrote for the
same case (size, spacing, origin, direction), so a map overlays its image in ITK-SNAP or 3D Slicer
exactly as nnU-Net's segmentation does. That holds for the reader/writers whose arrays are in the file's
own axis order (SimpleITKIO, nnU-Net's default for .nii.gz/.nrrd/.mha, and NibabelIO); the reorienting
ones (``*WithReorient``) are refused.

Files in ``OUT/maps/``: ``<case>_prob_<label>.nii.gz`` per foreground label, ``<case>_confidence.nii.gz``
(max probability), ``<case>_entropy.nii.gz`` (nats), ``<case>_mi.nii.gz`` (mutual information over folds,
nats; 0 everywhere with one fold). ``uint8``: probabilities and confidence stored as 0..255 with the NIfTI scale slope 1/255, so
viewers show 0..1 at a quarter of the float32 size; entropy and MI stay float32.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..io import atomic_write
from . import MAP_KINDS
from .uncertainty import entropy

MAP_DTYPES = ("float32", "uint8")
#: reader/writers whose arrays are in the axis order of the file they read and write
TEMPLATE_READERS = ("SimpleITKIO", "NibabelIO")
SUFFIX = ".nii.gz"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def check_map_request(kinds: Sequence[str], dtype: str, reader_writer: str | None = None) -> None:
    """Check a request for maps before anything is predicted or written.

    Mutual information is allowed with one fold, where it is 0 everywhere by definition.

    Args:
        kinds: the map kinds asked for (each one of :data:`~nnunet_mbls.inference.MAP_KINDS`); may be empty.
        dtype: ``"float32"`` or ``"uint8"``.
        reader_writer: the dataset's image reader/writer class name (plans' ``image_reader_writer``), or None
            when unknown (not checked).

    Raises:
        ValueError: naming the fix for an unknown kind or dtype, or (when maps are asked for) a reader other
            than :data:`TEMPLATE_READERS`, whose arrays are reoriented.
    """
    unknown = [k for k in kinds if k not in MAP_KINDS]
    if unknown:
        raise ValueError(f"unknown map kind(s) {unknown}; choose from {', '.join(MAP_KINDS)}")
    if dtype not in MAP_DTYPES:
        raise ValueError(f"--maps-dtype {dtype!r} is unknown; choose float32 or uint8")
    if kinds and reader_writer is not None and reader_writer not in TEMPLATE_READERS:
        raise ValueError(f"maps need images read by {' or '.join(TEMPLATE_READERS)}; this dataset uses {reader_writer}, "
                         f"whose arrays are reoriented: predict without --maps")


def label_file_name(name: str) -> str:
    """A label name as it appears in a file name (runs of characters other than letters, digits, _ . - become _)."""
    return _UNSAFE.sub("_", name)


class MapWriter:
    """Writes maps of shape (*image grid) next to each other, each atomically, in ``dtype``."""

    def __init__(self, folder: str | os.PathLike, dtype: str = "float32") -> None:
        check_map_request([], dtype)
        self.folder, self.dtype = Path(folder), dtype

    def write(self, case: str, suffix: str, volume: np.ndarray, template: sitk.Image, is_probability: bool) -> Path:
        """Write one map as ``<case>_<suffix>.nii.gz`` in the writer's folder, atomically.

        Args:
            case: the case name.
            suffix: the map's name, e.g. ``"entropy"`` or ``"prob_liver"``.
            volume: (*image grid) map in nnU-Net array order, 3-D (2-D images as (1, y, x), written 2-D when
                ``template`` is).
            template: the image whose size, spacing, origin and direction the map copies.
            is_probability: values in [0, 1]; with dtype ``uint8`` they are stored as 0..255 with scale
                slope 1/255 (other maps stay float32).

        Returns:
            The written path.
        """
        array = volume.reshape(volume.shape[-template.GetDimension():]) if template.GetDimension() < volume.ndim else volume
        path = self.folder / f"{case}_{suffix}{SUFFIX}"
        if self.dtype == "uint8" and is_probability:
            quantised = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
            return atomic_write(path, lambda tmp: _write_scaled_uint8(quantised, template, tmp))
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        image.CopyInformation(template)
        return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))


    def write_mask(self, case: str, suffix: str, mask: np.ndarray, template: sitk.Image) -> Path:
        """Write a binary mask as uint8 0/1 ``<case>_<suffix>.nii.gz`` (atomically), in ``template``'s geometry."""
        array = mask.reshape(mask.shape[-template.GetDimension():]) if template.GetDimension() < mask.ndim else mask
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
        image.CopyInformation(template)
        return atomic_write(self.folder / f"{case}_{suffix}{SUFFIX}", lambda tmp: sitk.WriteImage(image, tmp, True))


def _write_scaled_uint8(quantised: np.ndarray, template: sitk.Image, tmp: str) -> None:
    """uint8 voxels with NIfTI scl_slope = 1/255 (SimpleITK writes no slope; nibabel sets it)."""
    import nibabel

    image = sitk.GetImageFromArray(quantised)
    image.CopyInformation(template)
    sitk.WriteImage(image, tmp, True)
    written = nibabel.load(tmp)
    raw = np.asarray(written.dataobj.get_unscaled())
    scaled = nibabel.Nifti1Image(raw, None, written.header.copy())
    scaled.header.set_slope_inter(1.0 / 255.0, 0.0)
    nibabel.save(scaled, tmp)


def write_case_maps(writer: MapWriter, case: str, probabilities: np.ndarray, template: sitk.Image,
                    kinds: Sequence[str], foreground: Mapping[int, str], entropy_map: np.ndarray | None = None,
                    mutual_information: np.ndarray | None = None) -> list[Path]:
    """Write the requested maps of one case from its probabilities.

    Args:
        writer: the :class:`MapWriter` (folder and dtype).
        case: the case name.
        probabilities: (C, *image grid) probabilities.
        template: the image whose geometry the maps copy (nnU-Net's segmentation of the case).
        kinds: the map kinds to write (``probabilities``, ``confidence``, ``entropy``, ``mutual_information``).
        foreground: label value -> name of every foreground label (one probability map each).
        entropy_map: (*image grid) entropy when already computed; None computes it.
        mutual_information: (*image grid) mutual information over folds; needed for that kind.

    Returns:
        The written paths.

    Raises:
        ValueError: ``mutual_information`` was requested but not given.
    """
    written = []
    if "probabilities" in kinds:
        for label, name in foreground.items():
            written.append(writer.write(case, f"prob_{label_file_name(name)}", probabilities[label], template, True))
    if "confidence" in kinds:
        written.append(writer.write(case, "confidence", probabilities.max(0), template, True))
    if "entropy" in kinds:
        h = entropy(probabilities) if entropy_map is None else entropy_map
        written.append(writer.write(case, "entropy", h, template, False))
    if "mutual_information" in kinds:
        if mutual_information is None:
            raise ValueError("mutual_information was requested but not computed (it needs the folds' predictions)")
        written.append(writer.write(case, "mi", mutual_information, template, False))
    return written
