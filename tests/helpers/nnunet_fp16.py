"""Where two nnU-Net predictions of the same case can be compared closely.

nnU-Net's predictor accumulates logit x Gaussian tile weight, and the weights themselves, in fp16. Where the
summed weight of a voxel is subnormal in fp16 (below 2**-14: the crop box's border and corners, where each tile's
Gaussian has fallen to ~e^-8 per axis) its logits keep only a few bits, whatever the model (measured: up to 0.53
in probability there); everywhere else they keep fp16's 2**-11 relative precision (measured: at most 4.8e-3 in
probability, 31 classes at T = 0.28, tempering included). ``sliding_window_weight`` rebuilds that weight with
nnU-Net's own functions, independently of the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

#: probability tolerance where the weight is a normal fp16 number (4x the largest difference measured)
FP16_ATOL = 2e-2


def nonzero_box(image_files: list[Path]) -> list[list[int]]:
    """nnU-Net crops to the nonzero voxels of any channel: their bounding box, [start, end) per array axis."""
    nonzero = np.any([sitk.GetArrayFromImage(sitk.ReadImage(str(f))) != 0 for f in image_files], axis=0)
    idx = np.argwhere(nonzero)
    return [[int(a), int(b) + 1] for a, b in zip(idx.min(0), idx.max(0))]


def sliding_window_weight(plans_file: Path, configuration: str, image_files: list[Path]) -> np.ndarray:
    """nnU-Net's fp16 sum of Gaussian tile weights per voxel of one case, in the input image's array order.

    Built as nnU-Net's predictor builds it (``pad_nd_image``, ``compute_steps_for_sliding_window`` with step 0.5,
    ``compute_gaussian``) over the crop box in the network's (transposed) axis order; 2d configurations tile each
    slice along the first network axis. Assumes the case is at the configuration's target spacing (nothing
    resampled), as every generated dataset of these tests is. 0 outside the crop box.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    plans = json.loads(Path(plans_file).read_text())
    patch, order = plans["configurations"][configuration]["patch_size"], plans["transpose_forward"]
    box = nonzero_box(image_files)
    shape = [box[axis][1] - box[axis][0] for axis in order]
    tiled = shape[-len(patch):]
    padded, unpad = pad_nd_image(torch.zeros(tiled), patch, "constant", {"value": 0}, True, None)
    gaussian = compute_gaussian(tuple(patch), sigma_scale=1 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    weight = torch.zeros(padded.shape, dtype=torch.half)
    steps = compute_steps_for_sliding_window(tuple(padded.shape), tuple(patch), 0.5)
    for start in np.stack(np.meshgrid(*steps, indexing="ij"), -1).reshape(-1, len(patch)):
        weight[tuple(slice(a, a + t) for a, t in zip(start, patch))] += gaussian
    weight = np.broadcast_to(weight[unpad].float().numpy(), shape)
    full = np.zeros(sitk.GetArrayFromImage(sitk.ReadImage(str(image_files[0]))).shape, np.float32)
    full[tuple(slice(a, b) for a, b in box)] = weight.transpose(np.argsort(order))
    return full


def fp16_normal(weight: np.ndarray) -> np.ndarray:
    """Where ``weight`` is a normal fp16 number: where nnU-Net's logits keep fp16's relative precision."""
    return weight >= torch.finfo(torch.half).tiny


def assert_close_where_fp16_is_normal(actual: np.ndarray, expected: np.ndarray, weight: np.ndarray) -> None:
    """``actual`` == ``expected`` (C, *spatial) within FP16_ATOL wherever ``weight`` is a normal fp16 number,
    which must be most of the crop box."""
    normal = fp16_normal(weight)
    assert normal.sum() > 0.5 * np.count_nonzero(weight), "too few voxels with full fp16 precision to compare"
    np.testing.assert_allclose(actual[:, normal], expected[:, normal], atol=FP16_ATOL)
