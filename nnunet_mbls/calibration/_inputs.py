"""Input checks shared by the streaming metrics and the temperature subsampler.

Both consume one case at a time as ``probs (C, *spatial)``, ``target (*spatial)`` and an optional
``mask (*spatial)``, in chunks of voxels so that temporary memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

#: Voxels per chunk: temporaries are a few (C, CHUNK_VOXELS) tensors whatever the image size.
CHUNK_VOXELS = 2**21


def check_positive_int(name: str, value: object, example: int) -> int:
    """Validate a count argument that must be an integer >= 1.

    Args:
        name: the argument's name, for the message.
        value: the value given (a Python or numpy integer; bool is refused).
        example: a valid value to suggest in the message.

    Returns:
        ``value`` as an int.

    Raises:
        ValueError: naming ``name``, the value and ``example`` unless ``value`` is an integer >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; pass e.g. {name}={example}")
    return int(value)


def as_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    """Return ``x`` as a tensor (numpy arrays are wrapped without a copy).

    Args:
        x: a torch tensor (returned as is) or a numpy array, any shape.
        name: the argument's name, for the message.

    Returns:
        A tensor of the same shape and dtype, sharing memory with ``x``.

    Raises:
        ValueError: naming ``name`` when ``x`` is neither a torch.Tensor nor a numpy.ndarray.
    """
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.as_tensor(x)
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}; convert it first")


def flatten_case(
    probs: Tensor | np.ndarray, target: Tensor | np.ndarray, mask: Tensor | np.ndarray | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check the shapes and dtypes of one case and return flat views.

    Args:
        probs: (C, *spatial) floating probabilities.
        target: (*spatial) integer labels.
        mask: (*spatial) bool, True for voxels to use; None uses every voxel.

    Returns:
        probs (C, V), target (V,) and mask (V,) or None, target and mask on ``probs.device``.

    Raises:
        ValueError: an input is neither a tensor nor a numpy array; ``probs`` is not floating point or has
            no class axis; ``target``'s shape is not ``probs``' spatial shape or its dtype is not integer;
            ``mask``'s shape differs from ``target``'s or its dtype is not bool.
    """
    probs, target = as_tensor(probs, "probs"), as_tensor(target, "target")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point probabilities, got dtype {probs.dtype}; apply softmax first")
    if probs.ndim < 2:
        raise ValueError(f"probs must have shape (C, *spatial), got {tuple(probs.shape)}; add the class axis first")
    if tuple(target.shape) != tuple(probs.shape[1:]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match probs spatial shape {tuple(probs.shape[1:])} "
            f"(probs shape {tuple(probs.shape)}); pass target as (*spatial), e.g. squeeze nnU-Net's channel axis"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer labels, got dtype {target.dtype}; convert with target.long()")
    c = probs.shape[0]
    flat_mask = None
    if mask is not None:
        mask = as_tensor(mask, "mask")
        if tuple(mask.shape) != tuple(target.shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match target shape {tuple(target.shape)}; "
                "build the mask on the ground-truth grid (see region_mask)"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}; pass mask != 0 or mask.bool()")
        flat_mask = mask.reshape(-1).to(probs.device)
    return probs.reshape(c, -1), target.reshape(-1).to(probs.device), flat_mask


def iter_chunks(
    probs: Tensor, target: Tensor, mask: Tensor | None, chunk_voxels: int = CHUNK_VOXELS
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield checked chunks of the masked voxels; chunks without a masked voxel are skipped.

    Args:
        probs: (C, V) flat probabilities, as returned by :func:`flatten_case`.
        target: (V,) integer labels, as returned by :func:`flatten_case`.
        mask: (V,) bool, or None for every voxel.
        chunk_voxels: voxels read per chunk (default :data:`CHUNK_VOXELS`).

    Yields:
        ``(probs (C, n), target (n,) int64)`` of the masked voxels of one chunk, n <= chunk_voxels.

    Raises:
        ValueError: on non-finite probabilities, values outside [0, 1] or labels outside [0, C) among the
            masked voxels (raised when the offending chunk is reached).
    """
    c, v = probs.shape
    for start in range(0, v, chunk_voxels):
        p, t = probs[:, start : start + chunk_voxels], target[start : start + chunk_voxels]
        if mask is not None:
            m = mask[start : start + chunk_voxels]
            p, t = p[:, m], t[m]
        if t.numel() == 0:
            continue
        check_probs(p)
        check_labels(t, c)
        yield p, t.long()


def check_probs(p: Tensor) -> None:
    """Check that probabilities are finite and in [0, 1].

    One ``aminmax`` pass: NaN propagates into both results and ±Inf lands in one of them.

    Args:
        p: probabilities, any shape, non-empty.

    Raises:
        ValueError: ``p`` holds NaN/Inf, a value < 0, or a value > 1 + 1e-3 (the message suggests softmax).
    """
    lo, hi = (float(v) for v in torch.aminmax(p))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("probabilities contain NaN/Inf; check the network output or the saved .npz file")
    if lo < 0.0 or hi > 1.0 + 1e-3:
        raise ValueError(
            f"probs must be probabilities in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "apply softmax over the class axis to logits first"
        )


def check_labels(t: Tensor, num_classes: int) -> None:
    """Check that every label lies in [0, num_classes).

    Args:
        t: integer labels, any shape, non-empty.
        num_classes: C.

    Raises:
        ValueError: naming up to 10 offending values when a label is < 0 or >= ``num_classes``.
    """
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= num_classes:
        values = torch.unique(t[(t < 0) | (t >= num_classes)])[:10].tolist()
        raise ValueError(
            f"target contains labels {values} outside [0, {num_classes}) among the included voxels; "
            "exclude the ignore label with the mask (region_mask(..., ignore_label=...)) or check num_classes"
        )
