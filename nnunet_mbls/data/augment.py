"""Volume helpers shared by the dataset generators: smooth random fields, elastic warps, bias fields,
intensity changes, label merging and cropping, and ``write_augmented_dataset`` (one real volume with
labels → N randomly warped and re-contrasted nnU-Net cases), used by ``ch2`` and ``totalseg``.

All arrays are numpy arrays in (z, y, x) order (any number of dimensions where stated). Every random
function takes a ``numpy.random.Generator`` so that a seed reproduces the output exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_mbls.data.raw_dataset import (case_identifier, dataset_folder_name, new_dataset_folder,
                                          validate_positive_int, write_case, write_dataset_json)


def smooth_random_field(shape: Sequence[int], rng: np.random.Generator,
                        correlation: float | Sequence[float]) -> np.ndarray:
    """Smooth Gaussian-like random field of ``shape`` with zero mean and unit standard deviation.

    White noise on a coarse grid (one node per ``correlation`` voxels, per axis) upsampled with cubic
    splines: cheap for any size and smooth over about ``correlation`` voxels.

    Args:
        shape: output shape, any number of axes.
        rng: the random generator.
        correlation: correlation length in voxels, one number or one per axis.

    Returns:
        float32 array of ``shape`` (all zeros where the field comes out constant, e.g. a shape of ones).
    """
    shape = tuple(int(s) for s in shape)
    corr = np.broadcast_to(np.asarray(correlation, dtype=float), (len(shape),))
    coarse_shape = tuple(max(2, math.ceil(s / c)) + 1 if s > 1 else 1 for s, c in zip(shape, corr))
    coarse = rng.standard_normal(coarse_shape)
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse_shape)], order=3, mode="mirror",
                         grid_mode=False)[tuple(slice(0, s) for s in shape)]
    field = field - field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)


def bias_field(shape: Sequence[int], rng: np.random.Generator, strength: float,
               correlation: float | Sequence[float]) -> np.ndarray:
    """Smooth multiplicative bias field ``exp(strength * field)``, ``field`` from :func:`smooth_random_field`.

    Args:
        shape: output shape.
        rng: the random generator.
        strength: standard deviation of the log field, e.g. strength 0.2 ≈ ±20%.
        correlation: correlation length in voxels, one number or one per axis.

    Returns:
        float32 array of ``shape``, positive.
    """
    return np.exp(strength * smooth_random_field(shape, rng, correlation)).astype(np.float32)


def random_rotation(ndim: int, rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Random rotation matrix with each Euler angle uniform in ±``max_degrees``.

    Args:
        ndim: 2 (one angle) or 3 (three angles).
        rng: the random generator.
        max_degrees: largest angle in degrees.

    Returns:
        (ndim, ndim) float64 rotation matrix.
    """
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=1 if ndim == 2 else 3))
    def rot(a: float, i: int, j: int) -> np.ndarray:
        """Rotation by ``a`` radians in the plane of axes ``i`` and ``j``."""
        r = np.eye(ndim)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        return r
    if ndim == 2:
        return rot(angles[0], 0, 1)
    return rot(angles[0], 0, 1) @ rot(angles[1], 0, 2) @ rot(angles[2], 1, 2)


@dataclass(frozen=True)
class WarpParams:
    """Spatial augmentation: rotation (degrees), isotropic scaling range, elastic displacement (output voxels,
    standard deviation per axis) and its correlation length (output voxels)."""
    max_rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.92, 1.08)
    elastic_std: float = 1.5
    elastic_correlation: float = 8.0


def warp_coordinates(out_shape: Sequence[int], factor: Sequence[float], src_shape: Sequence[int],
                     rng: np.random.Generator, params: WarpParams) -> np.ndarray:
    """Source-voxel coordinates (ndim, *out_shape) of a random smooth warp sampled on an output grid.

    The output grid has ``factor`` source voxels per output voxel (per axis; block centres as in a
    block average) and is centred on the source; around that centre a random rotation and scaling
    is applied, then a smooth elastic displacement field.

    Args:
        out_shape: shape of the output grid (2 or 3 axes).
        factor: source voxels per output voxel, one per axis.
        src_shape: shape of the source volume.
        rng: the random generator.
        params: rotation, scaling and elastic parameters.

    Returns:
        (ndim, *out_shape) float32 source-voxel coordinates, for :func:`warp`.
    """
    ndim = len(out_shape)
    factor = np.asarray(factor, dtype=float)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in out_shape], indexing="ij"))
    out_centre = (np.asarray(out_shape) - 1) / 2.0
    src_centre = (np.asarray(src_shape) - 1) / 2.0
    rel = (grid.reshape(ndim, -1) - out_centre[:, None]) * factor[:, None]  # in source voxels
    scale = rng.uniform(*params.scale_range)
    affine = random_rotation(ndim, rng, params.max_rotation_deg) * scale
    coords = (affine @ rel + src_centre[:, None]).reshape(ndim, *out_shape)
    for axis in range(ndim):
        coords[axis] += params.elastic_std * factor[axis] * smooth_random_field(out_shape, rng,
                                                                                params.elastic_correlation)
    return coords.astype(np.float32)


def warp(image: np.ndarray, labels: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``image`` (linear) and ``labels`` (nearest) at ``coords``; edges are extended.

    Args:
        image: the source image, any ndim.
        labels: the source labels, same shape.
        coords: (ndim, *out_shape) source-voxel coordinates (:func:`warp_coordinates`).

    Returns:
        ``(image, labels)`` of ``out_shape``: the image float32, the labels in their input dtype.
    """
    img = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, mode="nearest")
    lab = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    return img, lab.astype(labels.dtype)


@dataclass(frozen=True)
class IntensityParams:
    """Intensity augmentation. ``floor`` is the value meaning "no signal" (0 for MRI, -1024 HU for CT);
    gamma is applied on ``(image - floor) / scale`` with ``scale`` the source's 99.5th percentile above
    floor, contrast multiplies and shift adds (in image units) afterwards, bias multiplies
    ``image - floor``, and Gaussian noise with a standard deviation drawn from ``noise_std`` is added."""
    floor: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    contrast_range: tuple[float, float] = (1.0, 1.0)
    shift_range: tuple[float, float] = (0.0, 0.0)
    bias_strength: float = 0.0
    bias_correlation: float = 24.0
    noise_std: tuple[float, float] = (0.0, 0.0)


def change_intensity(image: np.ndarray, rng: np.random.Generator, params: IntensityParams,
                     reference_scale: float) -> np.ndarray:
    """Random gamma, contrast, shift, bias field and noise (see ``IntensityParams``).

    Args:
        image: the image, any shape.
        rng: the random generator.
        params: the intensity parameters.
        reference_scale: the source's 99.5th percentile above ``params.floor`` (gamma acts on
            ``(image - floor) / reference_scale``).

    Returns:
        float32 array of the image's shape.
    """
    x = np.clip(image.astype(np.float32) - params.floor, 0, None) / reference_scale
    x = x ** rng.uniform(*params.gamma_range)
    x = x * reference_scale * rng.uniform(*params.contrast_range)
    if params.bias_strength > 0:
        x = x * bias_field(image.shape, rng, params.bias_strength, params.bias_correlation)
    x = x + params.floor + rng.uniform(*params.shift_range)
    sd = rng.uniform(*params.noise_std)
    if sd > 0:
        x = x + rng.normal(0.0, sd, size=x.shape).astype(np.float32)
    return x.astype(np.float32)


def merge_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map source label values to new ones; values not in ``mapping`` become 0.

    Args:
        labels: non-negative integer label map, any shape.
        mapping: source value -> new value (0..255).

    Returns:
        uint8 label map of the same shape.
    """
    lut = np.zeros(int(max(labels.max(), max(mapping))) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[labels]


def bbox_slices(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by ``margin`` voxels per axis and clipped to the array.

    Args:
        mask: bool array, any ndim.
        margin: voxels to add on each side, one per axis.

    Returns:
        One slice per axis.

    Raises:
        ValueError: ``mask`` is empty (the source labels contain none of the requested structures).
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("mask is empty: the source labels contain none of the requested structures")
    lo = np.maximum(idx.min(0) - np.asarray(margin), 0)
    hi = np.minimum(idx.max(0) + 1 + np.asarray(margin), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def augmented_cases(image: np.ndarray, labels: np.ndarray, num_cases: int, seed: int, factor: Sequence[float],
                    warp_params: WarpParams, intensity_params: IntensityParams,
                    anti_alias: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``num_cases`` augmented pairs warped from one source volume.

    Case ``i`` depends only on ``(seed, i)``, so a smaller ``num_cases`` gives a prefix of a larger one.

    Args:
        image: the source image (z, y, x), any ndim.
        labels: the source labels on the same grid.
        num_cases: number of cases to yield.
        seed: the seed; case ``i`` uses ``numpy.random.default_rng([seed, i])``.
        factor: source voxels per output voxel, one number or one per axis (e.g. 2 for 1 mm → 2 mm).
        warp_params: the spatial augmentation.
        intensity_params: the intensity augmentation.
        anti_alias: when True (default) and ``factor`` > 1 on some axis, the image is Gaussian-smoothed once
            before sampling (partial volume).

    Yields:
        ``(image float32, labels uint8)`` on the output grid, shape round(source shape / factor).
    """
    factor = np.broadcast_to(np.asarray(factor, dtype=float), (image.ndim,))
    out_shape = tuple(int(round(s / f)) for s, f in zip(image.shape, factor))
    src = image.astype(np.float32)
    if anti_alias and np.any(factor > 1):
        src = ndimage.gaussian_filter(src, sigma=[0.42 * f if f > 1 else 0 for f in factor])
    scale = float(np.percentile(src, 99.5) - intensity_params.floor) or 1.0
    for i in range(num_cases):
        rng = np.random.default_rng([seed, i])
        coords = warp_coordinates(out_shape, factor, image.shape, rng, warp_params)
        img, lab = warp(src, labels, coords)
        yield change_intensity(img, rng, intensity_params, scale), lab.astype(np.uint8)


def validate_augmented_args(dataset_id: int, name: str, num_cases: int, seed: int, spacing_mm: float | None,
                            margin_mm: float) -> None:
    """Check the arguments of an augmented-dataset generator before anything is read or written.

    Args:
        dataset_id: nnU-Net dataset id, 1..999.
        name: dataset name (letters, digits, ``_``, ``-``).
        num_cases: number of cases, >= 1.
        seed: seed, an integer >= 0.
        spacing_mm: output spacing in mm, > 0, or None to keep the source spacing.
        margin_mm: margin around the structures in mm, >= 0.

    Raises:
        ValueError: naming the argument for a bad dataset id/name, case count, seed, spacing or margin.
    """
    dataset_folder_name(dataset_id, name)
    validate_positive_int("num_cases", num_cases)
    validate_positive_int("seed", seed, minimum=0)
    if spacing_mm is not None and (isinstance(spacing_mm, bool) or not isinstance(spacing_mm, (int, float))
                                   or not spacing_mm > 0):
        raise ValueError(f"spacing_mm={spacing_mm!r} is invalid: pass a positive number of mm, or None to keep "
                         f"the source spacing")
    if isinstance(margin_mm, bool) or not isinstance(margin_mm, (int, float)) or not margin_mm >= 0:
        raise ValueError(f"margin_mm={margin_mm!r} is invalid: pass a number of mm >= 0")


def write_augmented_dataset(raw_root: str | os.PathLike, dataset_id: int, name: str, image: sitk.Image,
                            labels: np.ndarray, label_names: Mapping[str, int], *, num_cases: int, seed: int,
                            spacing_mm: float | None, margin_mm: float, warp_params: WarpParams,
                            intensity_params: IntensityParams, channel: str, overwrite: bool,
                            out_dtype: type = np.float32, **json_extra: object) -> Path:
    """Write ``num_cases`` augmented copies of one labelled volume as an nnU-Net raw dataset.

    The volume is cropped to the labelled structures plus ``margin_mm``, resampled to ``spacing_mm`` while
    warping, and written with the source orientation and a matching origin.

    Args:
        raw_root: the nnU-Net raw folder to write into.
        dataset_id: nnU-Net dataset id, 1..999.
        name: dataset name.
        image: the source (SimpleITK, 3-D).
        labels: its merged label map as numpy (z, y, x) uint8 on the same grid, values as in ``label_names``.
        label_names: dataset.json labels, name -> value (``background`` 0, consecutive).
        num_cases: number of cases, >= 1.
        seed: seed, >= 0; case ``i`` depends only on ``(seed, i)``.
        spacing_mm: output spacing in mm (isotropic); None keeps the source spacing.
        margin_mm: margin around the labelled structures in mm, >= 0.
        warp_params: the spatial augmentation.
        intensity_params: the intensity augmentation.
        channel: the name of the one input channel (e.g. ``"MRI"``, ``"CT"``).
        overwrite: replace an existing non-empty dataset folder.
        out_dtype: image dtype on disk (default float32); integer dtypes are rounded and clipped to their range.
        **json_extra: goes into dataset.json (e.g. ``description``, ``reference``, ``licence``).

    Returns:
        The dataset folder ``raw_root/DatasetXXX_Name``.

    Raises:
        ValueError: a bad argument (see :func:`validate_augmented_args`), no labelled voxel, a value of
            ``label_names`` absent from the cropped labels, or invalid ``label_names``.
        FileExistsError: the dataset folder exists and is not empty (without ``overwrite``), or another
            folder uses the same dataset id.
    """
    validate_augmented_args(dataset_id, name, num_cases, seed, spacing_mm, margin_mm)
    src = sitk.GetArrayFromImage(image)
    src_spacing = np.asarray(image.GetSpacing()[::-1], dtype=float)
    crop = bbox_slices(labels > 0, [math.ceil(margin_mm / s) for s in src_spacing])
    src, labels = src[crop], labels[crop]
    factor = np.ones(3) if spacing_mm is None else spacing_mm / src_spacing
    out_shape = np.array([int(round(s / f)) for s, f in zip(src.shape, factor)])
    first = (np.asarray(src.shape) - 1) / 2 - (out_shape - 1) / 2 * factor  # continuous source index of voxel 0
    origin = image.TransformContinuousIndexToPhysicalPoint(
        [float(c.start + f) for c, f in zip(crop, first)][::-1])
    missing = sorted(set(label_names.values()) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"label values {missing} of label_names={dict(label_names)} do not occur in the cropped "
                         f"source labels: drop them from label_names")
    with new_dataset_folder(raw_root, dataset_id, name, overwrite) as folder:
        cases = augmented_cases(src, labels, num_cases, seed, factor, warp_params, intensity_params)
        for i, (img, lab) in enumerate(cases):
            if np.issubdtype(out_dtype, np.integer):
                info = np.iinfo(out_dtype)
                img = np.clip(np.rint(img), info.min, info.max)
            write_case(folder, case_identifier(i), img.astype(out_dtype), lab, src_spacing * factor, origin,
                       image.GetDirection())
        write_dataset_json(folder, {"0": channel}, label_names, num_cases, name=name, **json_extra)
    return Path(raw_root) / dataset_folder_name(dataset_id, name)
