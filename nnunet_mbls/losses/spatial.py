"""Losses whose targets are spatially smoothed one-hot labels: SVLS and NACL.

Both convolve one-hot labels with a small depthwise kernel. Ignored voxels contribute nothing to
their neighbours' smoothed labels: their one-hot vector is zero. SVLS (replicate padding, kernel
summing to one) renormalises by the convolved validity mask, which changes nothing where no voxel is
ignored; NACL treats ignored voxels like its zero padding, as MONAI does at image borders.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import (
    SegmentationLoss,
    check_odd_kernel,
    check_positive,
    check_unit_interval,
    cross_entropy_map,
    float32_no_autocast,
    masked_mean,
)


def svls_kernel(sigma: float, spatial_dims: int) -> Tensor:
    """The SVLS authors' 3×3(×3) kernel: a Gaussian whose centre weight is replaced by the sum of
    its neighbours, normalised to sum 1. For σ = 1 in 2D: centre 0.5, edges 0.0778, corners 0.0472.
    Returns shape (3,) * spatial_dims, float32.
    """
    check_positive("sigma", sigma)
    offsets = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=spatial_dims)))
    kernel = torch.exp(-(offsets**2).sum(dim=1) / (2 * sigma**2)).reshape((3,) * spatial_dims)
    centre = (1,) * spatial_dims
    kernel[centre] = 0
    kernel[centre] = kernel.sum()
    return kernel / kernel.sum()


def one_hot_masked(target: Tensor, num_classes: int, mask: Tensor | None) -> Tensor:
    """(B, *spatial) int64 -> (B, C, *spatial) float32 one-hot, zero vectors where mask is False."""
    onehot = torch.zeros((target.shape[0], num_classes) + target.shape[1:], device=target.device)
    onehot.scatter_(1, target[:, None], 1.0)
    if mask is not None:
        onehot *= mask[:, None]
    return onehot


def depthwise_smooth(x: Tensor, kernel: Tensor, padding_mode: str) -> Tensor:
    """Convolve every channel of x (B, C, *spatial) with ``kernel`` (k,)*d; same-size output."""
    spatial_dims = x.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatially smoothed losses need 2D or 3D inputs, got logits of shape {tuple(x.shape)}")
    channels, radius = x.shape[1], kernel.shape[0] // 2
    weight = kernel.to(x).expand((channels, 1) + kernel.shape)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    if padding_mode == "replicate":
        return conv(F.pad(x, (radius,) * (2 * spatial_dims), mode="replicate"), weight, groups=channels)
    return conv(x, weight, padding=radius, groups=channels)


class SVLSLoss(SegmentationLoss):
    """Spatially varying label smoothing (Islam & Glocker): cross entropy against one-hot labels
    smoothed with :func:`svls_kernel` (replicate padding), mean over the non-ignored voxels.

    Args:
        sigma: Gaussian σ > 0 of the 3×3(×3) kernel (authors' default 1).
        ignore_label: label value whose voxels are excluded, or None.

    Shapes: logits (B, C, H, W) or (B, C, D, H, W), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    def __init__(self, sigma: float = 1.0, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.sigma = check_positive("sigma", sigma)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"sigma": self.sigma}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, mask = self.prepare(logits, target)
        kernel = svls_kernel(self.sigma, logits.ndim - 2)
        soft = depthwise_smooth(one_hot_masked(target, logits.shape[1], mask), kernel, "replicate")
        if mask is not None:
            soft = soft / depthwise_smooth(mask[:, None].float(), kernel, "replicate").clamp_min(1e-12)
        # Σ_k −s_k log p_k = logsumexp(l) − Σ_k s_k l_k since Σ_k s_k = 1
        per_voxel = torch.logsumexp(logits, dim=1) - (soft * logits).sum(dim=1)
        return masked_mean(per_voxel, mask)


class NACLLoss(SegmentationLoss):
    """Neighbor-aware calibration loss (Murugesan et al., MICCAI 2023), as in MONAI's ``NACLLoss``:
    CE + α · mean over voxels and classes of |meanfilter_k(onehot(y)) − logits| (L1, on logits,
    zero padding).

    Args:
        alpha: weight α in [0, 1) of the L1 term (default 0.1).
        kernel_size: odd size >= 3 of the mean filter (default 3).
        ignore_label: label value whose voxels are excluded, or None.

    Shapes: logits (B, C, H, W) or (B, C, D, H, W), target (B, 1, *spatial) or (B, *spatial) -> scalar.
    """

    def __init__(self, alpha: float = 0.1, kernel_size: int = 3, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.alpha = check_unit_interval("alpha", alpha)
        self.kernel_size = check_odd_kernel("kernel_size", kernel_size)

    @property
    def hyper_parameters(self) -> dict[str, float]:
        return {"alpha": self.alpha, "kernel_size": self.kernel_size}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, mask = self.prepare(logits, target)
        spatial_dims = logits.ndim - 2
        kernel = torch.full((self.kernel_size,) * spatial_dims, 1.0 / self.kernel_size**spatial_dims)
        smoothed = depthwise_smooth(one_hot_masked(target, logits.shape[1], mask), kernel, "zeros")
        l1 = (smoothed - logits).abs().sum(dim=1) / logits.shape[1]
        return masked_mean(cross_entropy_map(logits, target) + self.alpha * l1, mask)
