"""Shared machinery of the segmentation losses: argument checks, input preparation, masked means.

Every loss here follows nnU-Net's layout: logits (B, C, *spatial) and an integer target
(B, 1, *spatial) or (B, *spatial). Losses compute in float32 whatever dtype the logits arrive in
(autocast is switched off inside them), never mutate their inputs, and exclude voxels equal to
``ignore_label`` from every term.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn


def check_non_negative(name: str, value: float) -> float:
    if not value >= 0 or value != value:
        raise ValueError(f"{name}={value!r} is invalid: it must be a number >= 0 (e.g. {name}=0.1)")
    return float(value)


def check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be a number > 0 (e.g. {name}=1.0)")
    return float(value)


def check_unit_interval(name: str, value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must lie in [0, 1) (e.g. {name}=0.1)")
    return float(value)


def check_odd_kernel(name: str, value: int) -> int:
    if int(value) != value or value < 3 or value % 2 == 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be an odd integer >= 3 (e.g. {name}=3)")
    return int(value)


def check_ignore_label(value: int | None) -> int | None:
    if value is None:
        return None
    if int(value) != value or value < 0:
        raise ValueError(f"ignore_label={value!r} is invalid: it must be a non-negative integer or None")
    return int(value)


class Prepared(NamedTuple):
    """Inputs of a loss after validation.

    logits: (B, C, *spatial) float32; target: (B, *spatial) int64 with ignored voxels set to 0;
    mask: (B, *spatial) bool of the voxels that count, or None when nothing is ignored.
    """

    logits: Tensor
    target: Tensor
    mask: Tensor | None


def float32_no_autocast(forward):
    """Run ``forward`` with autocast disabled so every operation of the loss is float32."""

    @functools.wraps(forward)
    def wrapper(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return forward(self, logits, target)

    return wrapper


class SegmentationLoss(nn.Module):
    """Base class: holds ``ignore_label`` and prepares (logits, target) pairs."""

    def __init__(self, ignore_label: int | None = None) -> None:
        super().__init__()
        self.ignore_label = check_ignore_label(ignore_label)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        """Hyper-parameters of the loss, for logs and tables."""
        return {}

    def extra_repr(self) -> str:
        items = {**self.hyper_parameters, "ignore_label": self.ignore_label}
        return ", ".join(f"{k}={v}" for k, v in items.items())

    def prepare(self, logits: Tensor, target: Tensor) -> Prepared:
        if logits.ndim < 3:
            raise ValueError(
                f"logits must have shape (B, C, *spatial) with at least one spatial axis, got {tuple(logits.shape)}"
            )
        if logits.shape[1] < 2:
            raise ValueError(f"logits must have C >= 2 classes on axis 1, got shape {tuple(logits.shape)}")
        if target.ndim == logits.ndim:
            if target.shape[1] != 1:
                raise ValueError(
                    f"target of shape {tuple(target.shape)} must have 1 channel: (B, 1, *spatial) integer labels "
                    f"(one-hot/region targets are not supported by softmax losses)"
                )
            target = target[:, 0]
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
                f"expected (B, 1, *spatial) or (B, *spatial) = {tuple(logits.shape[:1] + logits.shape[2:])}"
            )
        if target.is_floating_point():
            target = target.round()
        target = target.long()
        mask = None
        if self.ignore_label is not None:
            mask = target != self.ignore_label
            target = torch.where(mask, target, 0)
        return Prepared(logits.float(), target, mask)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (B, *spatial) over the voxels where ``mask`` is True (all if None).

    Excluded voxels get neither weight nor gradient; an all-excluded batch gives 0.
    """
    if mask is None:
        return values.mean()
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def cross_entropy_map(logits: Tensor, target: Tensor) -> Tensor:
    """Per-voxel cross entropy −log softmax(logits)[target]: (B, C, *sp), (B, *sp) -> (B, *sp)."""
    return nn.functional.cross_entropy(logits, target, reduction="none")
