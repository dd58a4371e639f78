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
          and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 8 for s in shape))
    if not ok:
        raise ValueError(f"shape={shape!r} is invalid: pass 2 (2-D) or 3 (3-D) integers >= 8 in (z, y, x) "
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

    def __init__(self, shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator,
                 touch_border: bool = False) -> None:
        self.shape, self.spacing = shape, np.asarray(spacing)
        extent = np.asarray(shape) * self.spacing
        self.grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)],
                                         indexing="ij"))
        ndim = len(shape)
        c_outer = extent * rng.uniform(0.42, 0.58, ndim)
        r_outer = extent * rng.uniform(0.22, 0.30, ndim)
        if touch_border:  # the organ runs out of the field of view across the end of the last axis
            c_outer[-1] = extent[-1] - 0.6 * r_outer[-1]
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
        """Approximate signed distances (mm, negative inside) to the outer, inner and adjacent shapes.

        Args:
            jitter: one array of ``shape`` per structure added to its distance (a second rater's boundary),
                or None (default) for the true shapes.

        Returns:
            Three arrays of ``shape``: outer, inner, adjacent.
        """
        out = []
        for k, (c, r) in enumerate(self.ellipsoids):
            rel = (self.grid - c.reshape(-1, *[1] * len(self.shape))) / r.reshape(-1, *[1] * len(self.shape))
            d = (np.sqrt((rel ** 2).sum(0)) - 1.0) * float(np.mean(r)) + self.deform[k]
            out.append(d + jitter[k] if jitter is not None else d)
        return out

    @staticmethod
    def labels(d: list[np.ndarray], inner_margin: float) -> np.ndarray:
        """Label map of the three shapes: adjacent outside the organ, then outer, then inner nested in it.

        Args:
            d: the signed distances of :meth:`distances` (outer, inner, adjacent).
            inner_margin: mm the inner structure keeps from the organ's surface.

        Returns:
            uint8 label map with :data:`LABELS` values.
        """
        outer, inner, adj = d[0] < 0, d[1] < 0, d[2] < 0
        lab = np.zeros(outer.shape, dtype=np.uint8)
        lab[adj & ~outer] = LABELS["adjacent"]
        lab[outer] = LABELS["outer"]
        lab[inner & (d[0] < -inner_margin)] = LABELS["inner"]
        return lab


def _make_case(shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator, ignore_label: bool,
               channels: int = 1, touch_border: bool = False,
               with_adjacent: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """One case of ``shape``: (one float32 image per channel, labels uint8 with LABELS values).

    Retries until every structure is present (``adjacent`` only ``with_adjacent``). Channel 0 has the
    contrast ``CLASS_MEANS``; further channels draw their own class means, texture and noise (another
    MR sequence of the same anatomy), so that a second channel carries information of its own.
    """
    min_sp = float(min(spacing))
    required = [v for k, v in LABELS.items() if with_adjacent or k != "adjacent"]
    for _ in range(20):
        geo = _CaseGeometry(shape, spacing, rng, touch_border)

        def labels_of(distances: list[np.ndarray]) -> np.ndarray:
            """Labels of ``distances``, without the adjacent structure unless ``with_adjacent``."""
            if not with_adjacent:  # the adjacent structure is nowhere
                distances[2] = np.full(shape, np.inf)
            return geo.labels(distances, inner_margin=1.0 * min_sp)

        true = labels_of(geo.distances())
        # second rater: smooth boundary jitter of ~1 voxel, correlated over ~6 voxels
        jitter = [1.0 * min_sp * smooth_random_field(shape, rng, 6.0) for _ in range(3)]
        rater = labels_of(geo.distances(jitter))
        counts = np.bincount(rater.ravel(), minlength=len(LABELS))[required]
        if counts.min() >= MIN_VOXELS_PER_CLASS and np.bincount(true.ravel(), minlength=len(LABELS))[required].min() > 0:
            break
    else:  # pragma: no cover - geometry makes this practically impossible
        raise RuntimeError(f"could not place all structures in shape {shape}; use a larger shape")
    means = CLASS_MEANS + rng.uniform(-0.05, 0.05, len(CLASS_MEANS)).astype(np.float32)
    images = [_image(true, means, shape, spacing, min_sp, rng)]
    if ignore_label:
        ignore = len(LABELS)
        for _ in range(int(rng.integers(2, 5))):
            centre = rng.uniform(0, 1, len(shape)) * np.asarray(shape)
            radius = rng.uniform(0.04, 0.08) * min(shape)
            grid = np.ogrid[tuple(slice(0, n) for n in shape)]
            blob = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
            rater[blob] = ignore
    for _ in range(1, channels):
        images.append(_image(true, rng.uniform(0.2, 1.0, len(CLASS_MEANS)).astype(np.float32), shape, spacing, min_sp, rng))
    return images, rater


def _image(true: np.ndarray, means: np.ndarray, shape, spacing, min_sp: float, rng: np.random.Generator) -> np.ndarray:
    """Class intensities, texture, partial-volume blur, bias field and noise (float32)."""
    img = means[true] + 0.04 * smooth_random_field(shape, rng, 4.0)              # texture
    img = ndimage.gaussian_filter(img, sigma=[0.8 * min_sp / s for s in spacing])  # partial volume
    img = img * bias_field(shape, rng, 0.15, [max(2.0, n / 2) for n in shape])
    img = img + rng.normal(0.0, rng.uniform(0.08, 0.12), size=shape).astype(np.float32)
    return img.astype(np.float32)


def label_names(parcels: int = 1, ignore_label: bool = False) -> dict[str, int]:
    """dataset.json labels: background, the outer organ (or its ``parcels`` sectors), inner, adjacent, ignore.

    Args:
        parcels: number of sectors of the outer organ (default 1: one ``outer`` label; else ``outer_01`` ...).
        ignore_label: add ``ignore`` as the highest label (default False).

    Returns:
        Name -> consecutive label value from 0.
    """
    outer = ["outer"] if parcels == 1 else [f"outer_{k + 1:02d}" for k in range(parcels)]
    names = ["background", *outer, "inner", "adjacent"] + (["ignore"] if ignore_label else [])
    return {name: value for value, name in enumerate(names)}


def split_into_parcels(labels: np.ndarray, parcels: int, spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Relabel the ``outer`` organ as ``parcels`` angular sectors around its centre (labels 1..parcels).

    The sectors lie in the plane of the two longest axes (in mm) and start at a random angle; labels
    above ``outer`` move up by ``parcels - 1`` (so inner, adjacent and ignore keep their order).

    Args:
        labels: uint8 label map with :data:`LABELS` values (and ignore), 2-D or 3-D.
        parcels: number of sectors; 1 returns ``labels`` unchanged.
        spacing: mm per axis of ``labels``.
        rng: the random generator (the start angle).

    Returns:
        uint8 label map of the same shape.
    """
    if parcels == 1:
        return labels
    outer = labels == LABELS["outer"]
    out = np.where(labels > LABELS["outer"], labels.astype(np.int32) + parcels - 1, labels).astype(np.uint8)
    extent = np.asarray(labels.shape) * np.asarray(spacing)
    a, b = sorted(np.argsort(extent, kind="stable")[-2:])
    idx = np.argwhere(outer).astype(float)
    centre = idx.mean(0)
    angle = np.arctan2((idx[:, a] - centre[a]) * spacing[a], (idx[:, b] - centre[b]) * spacing[b])
    turn = (angle / (2 * np.pi) + rng.uniform(0, 1)) % 1.0
    out[outer] = (1 + np.minimum((turn * parcels).astype(int), parcels - 1)).astype(np.uint8)
    return out


def make_synthetic_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, name: str = "MbLSSynthetic",
                           num_cases: int = 40, shape: Sequence[int] = (96, 96), seed: int = 0,
                           ignore_label: bool = False, overwrite: bool = False,
                           spacing: Sequence[float] | None = None, channels: int = 1, parcels: int = 1,
                           adjacent_absent_every: int | None = None, touch_border: bool = False,
                           zero_margin: int = 0, origin: Sequence[float] | None = None,
                           direction: Sequence[float] | None = None) -> Path:
    """Write a synthetic nnU-Net raw dataset and return its folder ``raw_root/DatasetXXX_Name``.

    Labels: background 0, outer 1, inner 2 (nested in outer), adjacent 3 (touching outer). Channels "MRI"
    (and "MRI2", "MRI3", ...), z-score normalisation. Case ``i`` depends only on ``(seed, i)`` and the
    options; the same arguments give identical files. The geometry options (``parcels`` to ``direction``)
    are for testing every geometry nnU-Net handles.

    Args:
        raw_root: the nnU-Net raw folder to write into.
        dataset_id: nnU-Net dataset id, 1..999 (default 990).
        name: dataset name (default ``MbLSSynthetic``).
        num_cases: number of cases, >= 1 (default 40).
        shape: (z, y, x) or (y, x), each >= 8 (default (96, 96)): 2-D cases are stored as (1, y, x) NIfTI,
            which nnU-Net plans as a ``2d``-only dataset; 3-D cases get ``2d`` and ``3d_fullres``.
        seed: seed, >= 0 (default 0).
        ignore_label: a few random blobs get label 4 = "ignore" (nnU-Net's ignore label must be the highest
            value; with ``parcels`` > 1 it moves up with the other labels).
        overwrite: replace an existing non-empty dataset folder (default False).
        spacing: mm per axis, same order as ``shape`` (default None: 1 mm; the thickest axis is the one
            nnU-Net's planner moves first, so a thick last or middle axis gives a non-identity
            ``transpose_forward``).
        channels: number of input channels, >= 1 (default 1); further channels have contrasts of their own.
        parcels: > 1 splits the outer organ into that many sector labels (``outer_01`` ...; many classes);
            at most 250 (default 1).
        adjacent_absent_every: n >= 2 leaves the adjacent structure out of every n-th case (case n-1, 2n-1,
            ...: a class absent from a case); None (default) keeps it everywhere.
        touch_border: let the organ run out of the image across the last axis (default False).
        zero_margin: pad every side with that many voxels of exactly 0 in every channel (label 0), so
            nnU-Net's crop to the nonzero box is a real crop (default 0).
        origin: (x, y, z) as SimpleITK takes it; None (default) for 0.
        direction: 9 floats, row-major, as SimpleITK takes them; None (default) for identity.

    Returns:
        The dataset folder ``raw_root/DatasetXXX_Name``.

    Raises:
        ValueError: a bad argument (shape, spacing, counts, seed, parcels, margin, id or name).
        FileExistsError: an existing non-empty dataset folder unless ``overwrite``, or another folder with
            the same dataset id.
    """
    shape = _validate_shape(shape)
    spacing = _validate_spacing(spacing, len(shape))
    num_cases = validate_positive_int("num_cases", num_cases)
    seed = validate_positive_int("seed", seed, minimum=0)
    channels = validate_positive_int("channels", channels)
    parcels = validate_positive_int("parcels", parcels)
    zero_margin = validate_positive_int("zero_margin", zero_margin, minimum=0)
    if adjacent_absent_every is not None:
        validate_positive_int("adjacent_absent_every", adjacent_absent_every, minimum=2)
    if parcels > 250:
        raise ValueError(f"parcels={parcels} is invalid: labels are stored as uint8; pass at most 250")
    labels = label_names(parcels, ignore_label)
    write_spacing = spacing if len(shape) == 3 else (1.0, *spacing)
    as_3d = (1,) * (3 - len(shape)) + shape  # 2-D cases are written as (1, y, x)
    pad = [(0, 0)] * (3 - len(shape)) + [(zero_margin, zero_margin)] * len(shape)
    with new_dataset_folder(raw_root, dataset_id, name, overwrite) as folder:
        for i in range(num_cases):
            rng = np.random.default_rng([seed, i])
            with_adjacent = adjacent_absent_every is None or (i + 1) % adjacent_absent_every != 0
            images, lab = _make_case(shape, spacing, rng, ignore_label, channels, touch_border, with_adjacent)
            lab = split_into_parcels(lab, parcels, spacing, rng)
            images = [np.pad(img.reshape(as_3d), pad) for img in images]
            lab = np.pad(lab.reshape(as_3d), pad)
            write_case(folder, case_identifier(i), images, lab, write_spacing, origin, direction)
        write_dataset_json(
            folder, {str(k): "MRI" if k == 0 else f"MRI{k + 1}" for k in range(channels)}, labels, num_cases, name=name,
            description=(f"Synthetic {len(shape)}-D dataset from nnunet_mbls (seed={seed}, shape={shape}, "
                         f"spacing={spacing}): outer organ, nested inner structure, adjacent structure; "
                         f"overlapping class intensities, partial-volume blur, bias field, noise; labels "
                         f"from a smoothly jittered copy of the true shapes (simulated rater)."),
            reference="nnunet_mbls.data.synthetic.make_synthetic_dataset", licence="CC0-1.0")
    return Path(raw_root) / dataset_folder_name(dataset_id, name)
