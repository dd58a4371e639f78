"""Synthetic 2-D/3-D nnU-Net dataset built so that calibration matters.

Each case holds three structures: an ``outer`` organ (deformed ellipse/ellipsoid), an ``inner``
structure nested in it, and an ``adjacent`` structure that touches the organ from outside. The image
is made from the true shapes: class intensities whose distributions overlap (``adjacent`` is close to
``outer``), a smooth texture, partial-volume blur at the boundaries, a smooth multiplicative bias field
and Gaussian noise. The labels come from a smoothly jittered copy of the shapes, like a second rater,
so the boundary voxels carry irreducible (aleatoric) uncertainty that a calibrated model should show.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_mbls.data.augment import bias_field, smooth_random_field
from nnunet_mbls.data.raw_dataset import (case_identifier, dataset_folder_name, new_dataset_folder,
                                          validate_positive_int, write_case, write_dataset_json)

LABELS = {"background": 0, "outer": 1, "inner": 2, "adjacent": 3}
# mean intensity per label value (before per-case jitter, bias and noise); outer/adjacent overlap on purpose
CLASS_MEANS = np.array([0.25, 0.60, 0.90, 0.50], dtype=np.float32)
MIN_VOXELS_PER_CLASS = 10


def _validate_shape(shape: Sequence[int]) -> tuple[int, ...]:
    ok = (isinstance(shape, (tuple, list)) and len(shape) in (2, 3)
          and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 16 for s in shape))
    if not ok:
        raise ValueError(f"shape={shape!r} is invalid: pass 2 (2-D) or 3 (3-D) integers >= 16 in (z, y, x) "
                         f"order, e.g. shape=(96, 96) or shape=(32, 48, 48)")
    return tuple(int(s) for s in shape)


def _validate_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    try:
        spacing = tuple(float(s) for s in spacing)
        ok = len(spacing) == ndim and min(spacing) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"spacing={spacing!r} is invalid: pass {ndim} positive mm values matching shape, "
                         f"in (z, y, x) order, or None for 1 mm")
    return spacing


class _CaseGeometry:
    """Random shapes of one case as approximate signed distances (mm, negative inside) on a grid."""

    def __init__(self, shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator) -> None:
        self.shape, self.spacing = shape, np.asarray(spacing)
        extent = np.asarray(shape) * self.spacing
        self.grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)],
                                         indexing="ij"))
        ndim = len(shape)
        c_outer = extent * rng.uniform(0.42, 0.58, ndim)
        r_outer = extent * rng.uniform(0.22, 0.30, ndim)
        c_inner = c_outer + r_outer * rng.uniform(-0.2, 0.2, ndim)
        r_inner = r_outer * rng.uniform(0.4, 0.55, ndim)
        u = rng.normal(size=ndim)
        u = np.abs(u) * np.where(c_outer < extent / 2, 1.0, -1.0)  # towards the side with more room
        u /= np.linalg.norm(u)
        r_adj = extent * rng.uniform(0.10, 0.15, ndim)
        # distance from an ellipsoid's centre to its surface along u is 1 / |u / r|
        c_adj = c_outer + u * (1.0 / np.linalg.norm(u / r_outer) + 0.4 / np.linalg.norm(u / r_adj))
        self.ellipsoids = [(c_outer, r_outer), (c_inner, r_inner), (c_adj, r_adj)]
        # smooth shape deformation, a fraction of each structure's size (voxel correlation ~ 1/4 of the image)
        corr = [max(2.0, n / 4) for n in shape]
        self.deform = [0.12 * float(np.mean(r)) * smooth_random_field(shape, rng, corr) for _, r in self.ellipsoids]

    def distances(self, jitter: list[np.ndarray] | None = None) -> list[np.ndarray]:
        out = []
        for k, (c, r) in enumerate(self.ellipsoids):
            rel = (self.grid - c.reshape(-1, *[1] * len(self.shape))) / r.reshape(-1, *[1] * len(self.shape))
            d = (np.sqrt((rel ** 2).sum(0)) - 1.0) * float(np.mean(r)) + self.deform[k]
            out.append(d + jitter[k] if jitter is not None else d)
        return out

    @staticmethod
    def labels(d: list[np.ndarray], inner_margin: float) -> np.ndarray:
        outer, inner, adj = d[0] < 0, d[1] < 0, d[2] < 0
        lab = np.zeros(outer.shape, dtype=np.uint8)
        lab[adj & ~outer] = LABELS["adjacent"]
        lab[outer] = LABELS["outer"]
        lab[inner & (d[0] < -inner_margin)] = LABELS["inner"]
        return lab


def _make_case(shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator,
               ignore_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, labels uint8) pair of ``shape``; retries until every structure is present."""
    min_sp = float(min(spacing))
    for _ in range(20):
        geo = _CaseGeometry(shape, spacing, rng)
        true = geo.labels(geo.distances(), inner_margin=1.0 * min_sp)
        # second rater: smooth boundary jitter of ~1 voxel, correlated over ~6 voxels
        jitter = [1.0 * min_sp * smooth_random_field(shape, rng, 6.0) for _ in range(3)]
        rater = geo.labels(geo.distances(jitter), inner_margin=1.0 * min_sp)
        counts = np.bincount(rater.ravel(), minlength=len(LABELS))
        if counts.min() >= MIN_VOXELS_PER_CLASS and np.bincount(true.ravel(), minlength=len(LABELS)).min() > 0:
            break
    else:  # pragma: no cover - geometry makes this practically impossible
        raise RuntimeError(f"could not place all structures in shape {shape}; use a larger shape")
    means = CLASS_MEANS + rng.uniform(-0.05, 0.05, len(CLASS_MEANS)).astype(np.float32)
    img = means[true] + 0.04 * smooth_random_field(shape, rng, 4.0)              # texture
    img = ndimage.gaussian_filter(img, sigma=[0.8 * min_sp / s for s in spacing])  # partial volume
    img = img * bias_field(shape, rng, 0.15, [max(2.0, n / 2) for n in shape])
    img = img + rng.normal(0.0, rng.uniform(0.08, 0.12), size=shape).astype(np.float32)
    if ignore_label:
        ignore = len(LABELS)
        for _ in range(int(rng.integers(2, 5))):
            centre = rng.uniform(0, 1, len(shape)) * np.asarray(shape)
            radius = rng.uniform(0.04, 0.08) * min(shape)
            grid = np.ogrid[tuple(slice(0, n) for n in shape)]
            blob = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
            rater[blob] = ignore
    return img.astype(np.float32), rater


def make_synthetic_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, name: str = "MbLSSynthetic",
                           num_cases: int = 40, shape: Sequence[int] = (96, 96), seed: int = 0,
                           ignore_label: bool = False, overwrite: bool = False,
                           spacing: Sequence[float] | None = None) -> Path:
    """Write a synthetic nnU-Net raw dataset and return its folder ``raw_root/DatasetXXX_Name``.

    ``shape`` (z, y, x) or (y, x): 2-D cases are stored as (1, y, x) NIfTI, which nnU-Net plans as a
    ``2d``-only dataset; 3-D cases get ``2d`` and ``3d_fullres``. ``spacing`` in mm, same order as
    ``shape`` (default 1 mm). Labels: background 0, outer 1, inner 2 (nested in outer), adjacent 3
    (touching outer); with ``ignore_label`` a few random blobs get label 4 = "ignore" (nnU-Net's ignore
    label must be the highest value). Channel "MRI" (z-score normalisation). Case ``i`` depends only on
    ``(seed, i)``; the same arguments give identical files. Raises FileExistsError for an existing
    non-empty dataset folder unless ``overwrite``.
    """
    shape = _validate_shape(shape)
    spacing = _validate_spacing(spacing, len(shape))
    num_cases = validate_positive_int("num_cases", num_cases)
    seed = validate_positive_int("seed", seed, minimum=0)
    labels = dict(LABELS, ignore=len(LABELS)) if ignore_label else dict(LABELS)
    write_spacing = spacing if len(shape) == 3 else (1.0, *spacing)
    with new_dataset_folder(raw_root, dataset_id, name, overwrite) as folder:
        for i in range(num_cases):
            img, lab = _make_case(shape, spacing, np.random.default_rng([seed, i]), ignore_label)
            if len(shape) == 2:
                img, lab = img[None], lab[None]
            write_case(folder, case_identifier(i), img, lab, write_spacing)
        write_dataset_json(
            folder, {"0": "MRI"}, labels, num_cases, name=name,
            description=(f"Synthetic {len(shape)}-D dataset from nnunet_mbls (seed={seed}, shape={shape}, "
                         f"spacing={spacing}): outer organ, nested inner structure, adjacent structure; "
                         f"overlapping class intensities, partial-volume blur, bias field, noise; labels "
                         f"from a smoothly jittered copy of the true shapes (simulated rater)."),
            reference="nnunet_mbls.data.synthetic.make_synthetic_dataset", licence="CC0-1.0")
    return Path(raw_root) / dataset_folder_name(dataset_id, name)
