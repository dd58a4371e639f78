"""Folding a calibration map into a copy of an nnU-Net checkpoint, so that every nnU-Net command taking ``-chk``
predicts calibrated probabilities at zero inference cost."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from nnunet_mbls.calibration.temperature import _check_temperature
from nnunet_mbls.io import atomic_write, file_sha256


_HEAD_KEY = re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$")


def fold_temperature_into_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, T: float, *, overwrite: bool = False
) -> list[str]:
    """Write a copy of nnU-Net checkpoint ``src`` to ``dst`` whose network outputs logits / T.

    :func:`fold_logit_affine_into_checkpoint` with scale 1/T and bias 0.
    ``checkpoint['mbls_temperature']`` records the total temperature (T times any already recorded).

    Args:
        src: the trained checkpoint (e.g. ``checkpoint_final.pth``); never modified.
        dst: the file to write; must differ from ``src``.
        T: temperature, a finite number > 0.
        overwrite: replace an existing ``dst`` (default False).

    Returns:
        The modified state-dict keys (the head's weight, and its bias when it has one).

    Raises:
        ValueError: ``T`` is not a finite number > 0, or as :func:`fold_logit_affine_into_checkpoint`.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    T = _check_temperature(T)
    return fold_logit_affine_into_checkpoint(src, dst, 1.0 / T, 0.0, overwrite=overwrite, temperature=T)


def fold_logit_affine_into_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    scale: float | Sequence[float],
    bias: float | Sequence[float] = 0.0,
    *,
    overwrite: bool = False,
    temperature: float | None = None,
) -> list[str]:
    """Write a copy of nnU-Net checkpoint ``src`` to ``dst`` whose network outputs scale ⊙ logits + bias.

    The full-resolution head ``decoder.seg_layers.{i}`` with the highest i is a linear 1×1 convolution
    (logits = W h + b), so class k's weights become scale_k W_k and its bias scale_k b_k + bias_k: zero
    inference cost, unchanged argmax for a common scale and zero bias (temperature scaling). Averaging over
    folds and mirroring commutes with this map, so one map folded into every fold transforms the ensemble.
    Every other weight and all state-dict keys stay as they are, so nnU-Net's predictor loads ``dst``
    strictly under any trainer name (stock ``nnUNetTrainer`` too). The file is for inference: the optimizer
    and grad-scaler states (as large as the weights) are left out; ``checkpoint['mbls_source']`` names the
    trained checkpoint it derives from (file name and SHA-256); ``checkpoint['mbls_logit_affine']``
    records the map (composed with any map ``src`` already had), and ``temperature`` (T times any already
    recorded) goes to ``checkpoint['mbls_temperature']``.

    Args:
        src: the nnU-Net v2 checkpoint to copy; never modified.
        dst: the file to write (atomically); must differ from ``src`` and is only replaced when ``overwrite``
            is True.
        scale, bias: a number, or one value per class (C,); scale > 0; bias defaults to 0.
        overwrite: replace an existing ``dst`` (default False).
        temperature: the temperature this map stands for, recorded in ``checkpoint['mbls_temperature']``;
            None (default) records none.

    Returns:
        The modified state-dict keys (the head's weight, and its bias when it has one).

    Raises:
        ValueError: ``dst`` is ``src``; the checkpoint has no ``network_weights`` state dict or no such head;
            ``scale``/``bias`` is neither one finite number nor C finite values; a scale is <= 0; the head
            has no bias and ``bias`` is nonzero.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(
            f"dst {dst} is the source checkpoint; write to another file, e.g. checkpoint_final_calibrated.pth"
        )
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{src} has no 'network_weights' state dict; is it an nnU-Net v2 checkpoint?")
    heads = [(int(m.group(1)), key) for key in weights if (m := _HEAD_KEY.match(key))]
    weight_heads = [i for i, key in heads if key.endswith(".weight")]
    if not weight_heads:
        raise ValueError(
            f"{src} has no keys decoder.seg_layers.{{i}}.weight / .bias (the linear segmentation head); "
            "this architecture cannot take a folded temperature: use apply_temperature on the saved .npz "
            "probabilities instead"
        )
    last = max(weight_heads)
    weight_key, bias_key = f"decoder.seg_layers.{last}.weight", f"decoder.seg_layers.{last}.bias"
    num_classes = weights[weight_key].shape[0]
    a = _per_class("scale", scale, num_classes)
    b = _per_class("bias", bias, num_classes)
    if not bool((a > 0).all()):
        raise ValueError(f"scale must be > 0 for every class, got {a.tolist()}; a fitted scale is positive")
    shape = (num_classes,) + (1,) * (weights[weight_key].ndim - 1)
    weights[weight_key] = weights[weight_key] * a.to(weights[weight_key].dtype).reshape(shape)
    modified = [weight_key]
    if bias_key in weights:
        weights[bias_key] = weights[bias_key] * a.to(weights[bias_key].dtype) + b.to(weights[bias_key].dtype)
        modified.append(bias_key)
    elif bool((b != 0).any()):
        raise ValueError(f"{src}: the segmentation head has no bias, so a nonzero bias cannot be folded into it")
    earlier = checkpoint.get("mbls_logit_affine", {"scale": [1.0] * num_classes, "bias": [0.0] * num_classes})
    a0, b0 = torch.tensor(earlier["scale"], dtype=torch.float64), torch.tensor(earlier["bias"], dtype=torch.float64)
    checkpoint["mbls_logit_affine"] = {"scale": (a * a0).tolist(), "bias": (a * b0 + b).tolist()}
    if temperature is not None:
        checkpoint["mbls_temperature"] = float(checkpoint.get("mbls_temperature", 1.0)) * temperature
    for key in ("optimizer_state", "grad_scaler_state"):
        checkpoint.pop(key, None)
    # the trained checkpoint this file derives from (kept through further folds): what "is calibrated" checks
    checkpoint.setdefault("mbls_source", {"file": src.name, "sha256": file_sha256(src)})
    atomic_write(dst, lambda tmp: torch.save(checkpoint, tmp))
    return modified


def _per_class(name: str, value: float | Sequence[float], num_classes: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(num_classes).clone()
    if t.numel() != num_classes or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be a finite number or {num_classes} finite values (one per class), got {value!r}")
    return t
