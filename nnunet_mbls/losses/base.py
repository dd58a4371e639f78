"""Shared machinery of the segmentation losses: argument checks, input preparation, masked means.

Every loss here follows nnU-Net's layout: logits (B, C, *spatial) and an integer target
(B, 1, *spatial) or (B, *spatial). Losses compute in float32 whatever dtype the logits arrive in
(autocast is switched off inside them), never mutate their inputs, and exclude voxels equal to
``ignore_label`` from every term.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn


def _checked_number(name: str, value: object, requirement: str, ok, example: str) -> float:
    """``value`` as a float if it is a real number for which ``ok(number)`` holds, else a ValueError naming
    ``name``, the value, ``requirement`` and a fix.

    Real numbers are Python ints and floats, numpy scalars and 0-d numpy arrays / torch tensors of a real
    dtype; bool, str, None, sequences, complex numbers and NaN are not (a config may hold any of them).
    """
    number = value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        kind = type(number).__name__
        kind = "None" if number is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    elif math.isnan(number):
        kind = "NaN"
    elif ok(float(number)):
        return float(number)
    else:
        kind = None
    if isinstance(value, str):  # a number written as text: suggest that number, if it would be accepted
        try:
            parsed = float(value)
            if ok(parsed):
                example = str(int(parsed)) if parsed.is_integer() else repr(parsed)
        except (ValueError, OverflowError):
            pass
    raise ValueError(f"{name}={value!r} is invalid: it must be {requirement}{f', not {kind}' if kind else ''} "
                     f"(e.g. {name}={example})")


def check_non_negative(name: str, value: float) -> float:
    """Validate a hyper-parameter that must be a real number >= 0.

    Args:
        name: the argument's name, for the error message (e.g. ``"margin"``).
        value: the value given: a Python int/float, a numpy scalar or a 0-d numpy array / torch tensor.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: naming ``name``, the value and an example when ``value`` is not a real number (bool, str,
            None, a sequence, a complex number, NaN) or is < 0.
    """
    return _checked_number(name, value, "a number >= 0", lambda x: x >= 0, "0.1")


def check_positive(name: str, value: float) -> float:
    """Validate a hyper-parameter that must be a real number > 0.

    Args:
        name: the argument's name, for the error message (e.g. ``"sigma"``).
        value: the value given: a Python int/float, a numpy scalar or a 0-d numpy array / torch tensor.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: naming ``name``, the value and an example when ``value`` is not a real number (bool, str,
            None, a sequence, a complex number, NaN) or is <= 0.
    """
    return _checked_number(name, value, "a number > 0", lambda x: x > 0, "1.0")


def check_unit_interval(name: str, value: float) -> float:
    """Validate a hyper-parameter that must be a real number in [0, 1).

    Args:
        name: the argument's name, for the error message (e.g. ``"alpha"``).
        value: the value given: a Python int/float, a numpy scalar or a 0-d numpy array / torch tensor.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: naming ``name``, the value and an example when ``value`` is not a real number (bool, str,
            None, a sequence, a complex number, NaN) or lies outside [0, 1).
    """
    return _checked_number(name, value, "a number in [0, 1)", lambda x: 0 <= x < 1, "0.1")


def check_odd_kernel(name: str, value: int) -> int:
    """Validate a kernel size that must be an odd integer >= 3.

    Args:
        name: the argument's name, for the error message (e.g. ``"kernel_size"``).
        value: the value given; an integral float such as ``3.0`` is accepted.

    Returns:
        ``value`` as an int.

    Raises:
        ValueError: naming ``name``, the value and an example when ``value`` is not a real number, not
            integral, even, or < 3.
    """
    odd = lambda x: x.is_integer() and x >= 3 and x % 2 == 1  # noqa: E731
    return int(_checked_number(name, value, "an odd integer >= 3", odd, "3"))


def check_ignore_label(value: int | None) -> int | None:
    """Validate nnU-Net's ignore label: a non-negative integer, or None for "nothing ignored".

    Args:
        value: the label value whose voxels are excluded, or None; an integral float is accepted.

    Returns:
        ``value`` as an int, or None.

    Raises:
        ValueError: naming ``ignore_label`` when ``value`` is neither None nor a non-negative integer.
    """
    if value is None:
        return None
    requirement = "a non-negative integer or None"
    return int(_checked_number("ignore_label", value, requirement, lambda x: x.is_integer() and x >= 0, "None"))


class Prepared(NamedTuple):
    """Inputs of a loss after validation.

    logits: (B, C, *spatial) float32; target: (B, *spatial) int64 with ignored voxels set to 0;
    mask: (B, *spatial) bool of the voxels that count, or None when nothing is ignored.
    """

    logits: Tensor
    target: Tensor
    mask: Tensor | None


def float32_no_autocast(forward):
    """Decorate a loss's ``forward`` so that it runs with autocast disabled (every operation in float32).

    Args:
        forward: the method ``forward(self, logits, target) -> Tensor`` to wrap.

    Returns:
        The wrapped method (name and docstring of ``forward``, via ``functools.wraps``); autocast is switched
        off for the device type of ``logits``.
    """

    @functools.wraps(forward)
    def wrapper(self, logits: Tensor, target: Tensor) -> Tensor:
        """``forward(self, logits, target)`` under ``torch.autocast(..., enabled=False)``."""
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
        """Hyper-parameters of the loss, for logs and tables.

        Returns:
            name -> value; empty here, subclasses list their own (``ignore_label`` is not included).
        """
        return {}

    def extra_repr(self) -> str:
        """The module's ``repr`` details: every hyper-parameter and ``ignore_label``.

        Returns:
            ``"name=value, ..., ignore_label=..."``.
        """
        items = {**self.hyper_parameters, "ignore_label": self.ignore_label}
        return ", ".join(f"{k}={v}" for k, v in items.items())

    def prepare(self, logits: Tensor, target: Tensor) -> Prepared:
        """Validate a (logits, target) pair and bring it into the form every loss computes on.

        Args:
            logits: (B, C, *spatial) raw network outputs, C >= 2, at least one spatial axis; any float dtype.
            target: (B, 1, *spatial) or (B, *spatial) integer labels; a float target is rounded first.

        Returns:
            :class:`Prepared`: logits as float32 (B, C, *spatial); target (B, *spatial) int64 with the voxels of
            ``ignore_label`` set to 0; mask (B, *spatial) bool of the voxels that count, or None when
            ``ignore_label`` is None.

        Raises:
            ValueError: ``logits`` has fewer than 3 axes or fewer than 2 classes; ``target`` has a channel axis
                of size other than 1 (one-hot/region targets are not supported by softmax losses); ``target``'s
                shape does not match (B, *spatial) of ``logits``.
        """
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
    """Mean of ``values`` over the voxels where ``mask`` is True (all if None).

    Excluded voxels get neither weight nor gradient; an all-excluded batch gives 0.

    Args:
        values: (B, *spatial) per-voxel loss.
        mask: (B, *spatial) bool, True for the voxels that count; None counts every voxel.

    Returns:
        Scalar tensor: the masked mean.
    """
    if mask is None:
        return values.mean()
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def cross_entropy_map(logits: Tensor, target: Tensor) -> Tensor:
    """Per-voxel cross entropy −log softmax(logits)[target].

    Args:
        logits: (B, C, *spatial) float logits.
        target: (B, *spatial) int64 labels in [0, C).

    Returns:
        (B, *spatial) cross entropy, unreduced.
    """
    return nn.functional.cross_entropy(logits, target, reduction="none")
