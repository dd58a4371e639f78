"""Voxel regions in which calibration is measured: foreground, all (cropped), boundary band."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from nnunet_mbls.calibration._inputs import check_positive_int
from nnunet_mbls.defaults import REGIONS


def region_mask(
    target: np.ndarray | Tensor,
    region: str,
    ignore_label: int | None = None,
    crop_bbox: Sequence[Sequence[int]] | None = None,
    boundary_width: int = 2,
) -> np.ndarray | Tensor:
    """Bool mask (*spatial) of the voxels of ``region``, same type as ``target`` (a tensor stays on its device).

    Args:
        target: (*spatial) integer ground-truth labels.
        region: ``"fg"``: label != 0 (the paper's mode); ``"all"``: every voxel inside ``crop_bbox``;
            ``"boundary"``: voxels whose box (Chebyshev) neighbourhood of radius ``boundary_width``
            holds a ground-truth label different from their own, i.e. a band of ``boundary_width``
            voxels on each side of every interface between labels. The image border is not a boundary.
        ignore_label: voxels with this label are excluded from every region, and do not create
            boundaries (the true label there is unknown).
        crop_bbox: nnU-Net's crop box in the axis order of ``target``, [start, end) per axis: the case's
            ``bbox_used_for_cropping`` mapped out of nnU-Net's transposed order by
            :func:`nnunet_mbls.geometry.crop_box`. Only restricts ``"all"``: outside the box nnU-Net writes background probability
            exactly 1, which would flood an all-voxel metric. ``"fg"`` and ``"boundary"`` are left
            unrestricted on purpose, so ground truth outside the box still counts as a (certain) miss.
            None means the whole image.
        boundary_width: band half-width in voxels, >= 1 (default 2).

    Returns:
        (*spatial) bool mask: a numpy array for numpy input, a tensor on ``target``'s device for a tensor.

    Raises:
        ValueError: ``region`` is not one of :data:`~nnunet_mbls.defaults.REGIONS`; ``target`` does not hold
            integer labels; for ``"all"``, ``crop_bbox`` is not [start, end) per axis within the image; for
            ``"boundary"``, ``boundary_width`` is not an integer >= 1.
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    is_tensor = isinstance(target, Tensor)
    labels = target.detach().cpu().numpy() if is_tensor else np.asarray(target)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"target must hold integer labels, got dtype {labels.dtype}; convert with .astype(int)")
    if region == "fg":
        mask = labels != 0
    elif region == "all":
        mask = _bbox_mask(labels.shape, crop_bbox)
    else:
        mask = _boundary_band(labels, ignore_label, boundary_width)
    if ignore_label is not None:
        mask &= labels != ignore_label
    return torch.from_numpy(mask).to(target.device) if is_tensor else mask


def _bbox_mask(shape: tuple[int, ...], crop_bbox: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Bool array of ``shape``, True inside the [start, end) box (everywhere if None)."""
    if crop_bbox is None:
        return np.ones(shape, dtype=bool)
    box = [tuple(int(v) for v in axis) for axis in crop_bbox]
    if len(box) != len(shape) or any(len(a) != 2 or not 0 <= a[0] <= a[1] <= n for a, n in zip(box, shape)):
        raise ValueError(
            f"crop_bbox must be [start, end) per axis within the image shape {shape}, got {crop_bbox!r}; "
            "map the case's bbox_used_for_cropping (nnU-Net's transposed axis order) to the image's axis order with "
            "nnunet_mbls.geometry.crop_box first"
        )
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in box)] = True
    return mask


def _boundary_band(labels: np.ndarray, ignore_label: int | None, width: int) -> np.ndarray:
    """True where the (2*width+1)^d box around a voxel holds two different non-ignore labels.

    Since the voxel itself is in its box, this equals "a label different from its own is within
    Chebyshev distance ``width``", computed with one grey maximum and one minimum filter instead of an
    erosion per label. Ignore voxels are sent below every label for the maximum and above every label
    for the minimum, so they never make a difference. mode="nearest" keeps the image border out.
    """
    size = 2 * check_positive_int("boundary_width", width, 2) + 1
    # the narrowest type that holds the labels and, with an ignore label, a value below and above all of them
    # (the filters' time and memory scale with it: uint8 labels of a CT volume stay uint8)
    if labels.dtype.itemsize <= 2 or labels.dtype == np.int32:
        dtype = labels.dtype if ignore_label is None else np.int32
    else:
        dtype = np.int64
    lab = labels.astype(dtype, copy=False)
    lo, hi = lab, lab
    if ignore_label is not None:
        ignored = lab == ignore_label
        lo = np.where(ignored, np.iinfo(dtype).min, lab)
        hi = np.where(ignored, np.iinfo(dtype).max, lab)
    highest = ndimage.maximum_filter(lo, size=size, mode="nearest")
    return highest != ndimage.minimum_filter(hi, size=size, mode="nearest")
