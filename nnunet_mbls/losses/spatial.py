"""Losses whose targets are spatially smoothed one-hot labels: SVLS and NACL.

Both convolve one-hot labels with a small kernel. Ignored voxels contribute nothing to their
neighbours' smoothed labels: their one-hot vector is zero. SVLS (replicate padding, kernel summing to
one) renormalises by the convolved validity mask (= the sum of the smoothed vector), which changes
nothing where no voxel is ignored; NACL treats ignored voxels like its zero padding, as MONAI does at
image borders. Both kernels are applied as separable passes (the SVLS kernel is a separable Gaussian
plus a centre term), and the losses are evaluated by :func:`nnunet_mbls.losses.fused.voxelwise_loss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import (
    SegmentationLoss,
    check_odd_kernel,
    check_positive,
    check_unit_interval,
    float32_no_autocast,
    masked_mean,
)
from . import fused
from .fused import VoxelTerms, nll, subtract_onehot_, voxelwise_loss


def svls_taps(sigma: float, spatial_dims: int) -> tuple[list[float], float]:
    """The SVLS authors' kernel in separable form, unnormalised.

    The 3-tap Gaussian [e, 1, e], e = exp(−1 / (2σ²)), on every axis, plus ``centre_extra`` at the centre,
    which raises the centre weight to the sum of its neighbours, (1 + 2e)^d − 1.

    Args:
        sigma: Gaussian σ > 0.
        spatial_dims: d, the number of spatial axes (2 or 3 in the losses).

    Returns:
        ``(taps, centre_extra)``: the taps [e, 1, e] and the weight to add at the centre.

    Raises:
        ValueError: ``sigma`` is not a number > 0.
    """
    check_positive("sigma", sigma)
    edge = math.exp(-1 / (2 * sigma**2))
    return [edge, 1.0, edge], (1 + 2 * edge) ** spatial_dims - 2


def svls_kernel(sigma: float, spatial_dims: int) -> Tensor:
    """The SVLS authors' 3×3(×3) kernel: a Gaussian whose centre weight is replaced by the sum of
    its neighbours, normalised to sum 1.

    For σ = 1 in 2D: centre 0.5, edges 0.0778, corners 0.0472. Built from :func:`svls_taps`, which the
    loss uses.

    Args:
        sigma: Gaussian σ > 0.
        spatial_dims: number of spatial axes.

    Returns:
        Tensor of shape (3,) * spatial_dims, float32, summing to 1.

    Raises:
        ValueError: ``sigma`` is not a number > 0.
    """
    taps, centre_extra = svls_taps(sigma, spatial_dims)
    kernel = torch.ones(())
    for _ in range(spatial_dims):
        kernel = kernel[..., None] * torch.tensor(taps)
    kernel[(1,) * spatial_dims] += centre_extra
    return kernel / kernel.sum()


def _check_spatial_dims(logits: Tensor) -> None:
    if logits.ndim - 2 not in (2, 3):
        raise ValueError(f"spatially smoothed losses need 2D or 3D inputs, got logits of shape {tuple(logits.shape)}")


def _pad_labels(labels: Tensor, radius: int, replicate: bool, fill: int) -> Tensor:
    """Pad every spatial axis of ``labels`` (B, *spatial) int64 by ``radius``: edge labels repeated, or ``fill``."""
    if not replicate:
        return F.pad(labels, (radius,) * (2 * (labels.ndim - 1)), value=fill)
    for axis in range(1, labels.ndim):
        n = labels.shape[axis]
        labels = labels.index_select(axis, torch.arange(-radius, n + radius, device=labels.device).clamp_(0, n - 1))
    return labels


def smoothed_onehot(labels: Tensor, num_classes: int, taps: list[float], centre_extra: float = 0.0,
                    replicate: bool = False, normalise: bool = False) -> Tensor:
    """onehot(labels) convolved with the kernel taps ⊗ ... ⊗ taps (one factor per spatial axis) plus
    ``centre_extra`` at the centre.

    The kernel is separable, so each axis is a (2r+1)-tap pass, and the work is done in slabs along the
    first spatial axis (one slab on CUDA) so that temporaries stay small (see :mod:`nnunet_mbls.losses.fused`).

    Args:
        labels: (B, *spatial) int64 labels in [0, num_classes]; labels equal to ``num_classes`` (e.g.
            ignored voxels) have a zero one-hot vector.
        num_classes: C.
        taps: the 1-D kernel, 2r+1 weights, applied on every spatial axis.
        centre_extra: weight added at the kernel's centre (default 0).
        replicate: borders: replicate the edge labels (True) or zero-pad the one-hot (False, default).
        normalise: divide each voxel's vector by its sum (a voxel whose whole neighbourhood is excluded gets
            zeros); default False.

    Returns:
        (B, C, *spatial) float32 smoothed one-hot.
    """
    radius = len(taps) // 2
    padded = _pad_labels(labels, radius, replicate, fill=num_classes)
    batch, depth = labels.shape[:2]
    out = torch.empty((batch, num_classes) + labels.shape[1:], device=labels.device)
    slab_elements = batch * (num_classes + 1) * math.prod(padded.shape[2:])
    step = depth if labels.is_cuda else max(1, fused.CHUNK_ELEMENTS // slab_elements)
    for start in range(0, depth, step):
        block = padded[:, start : min(start + step, depth) + 2 * radius].unsqueeze(1)
        onehot = torch.zeros((batch, num_classes + 1) + block.shape[2:], device=labels.device)
        onehot = onehot.scatter_(1, block, 1.0)[:, :num_classes]
        smooth, centre = onehot, onehot
        for axis in range(2, onehot.ndim):
            n = smooth.shape[axis] - 2 * radius
            acc = smooth.narrow(axis, 0, n) * taps[0]
            for offset in range(1, len(taps)):
                acc.add_(smooth.narrow(axis, offset, n), alpha=taps[offset])
            smooth, centre = acc, centre.narrow(axis, radius, n)
        if centre_extra:
            smooth.add_(centre, alpha=centre_extra)
        if normalise:
            smooth.div_(smooth.sum(dim=1, keepdim=True).clamp_min_(1e-12))
        out[:, :, start : start + step] = smooth
    return out


def _excluded_as_extra_class(target: Tensor, mask: Tensor | None, num_classes: int) -> Tensor:
    """Target with the ignored voxels set to ``num_classes``, which :func:`smoothed_onehot` leaves out."""
    return target if mask is None else torch.where(mask, target, num_classes)


class _SoftTargetTerms(VoxelTerms):
    """Per voxel −Σ_k s_k log p_k for soft targets s summing to 1; gradient softmax − s."""

    def value(self, x: Tensor, soft: Tensor) -> Tensor:
        """Per-voxel −Σ_k s_k log p_k.

        Args:
            x: (B, C, n) float32 logits of a chunk (not modified).
            soft: (B, C, n) soft targets s.

        Returns:
            (B, n) loss per voxel.
        """
        return (torch.log_softmax(x, dim=1) * soft).sum(dim=1).neg_()

    def gradient(self, x: Tensor, grad: Tensor, soft: Tensor) -> Tensor:
        """Gradient (softmax − s) · grad.

        Args:
            x: (B, C, n) float32 logits of a chunk (not modified).
            grad: (B, 1, n) incoming gradient of each voxel's loss.
            soft: (B, C, n) soft targets s.

        Returns:
            (B, C, n) new tensor.
        """
        return torch.softmax(x, dim=1).sub_(soft).mul_(grad)


class _NACLTerms(VoxelTerms):
    """Per voxel −log p_y + w · Σ_k |s_k − l_k|; gradient softmax − onehot + w · sign(l − s)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def value(self, x: Tensor, t: Tensor, soft: Tensor) -> Tensor:
        """Per-voxel −log p_y + w · Σ_k |s_k − l_k|.

        Args:
            x: (B, C, n) float32 logits l of a chunk (not modified).
            t: (B, 1, n) int64 labels.
            soft: (B, C, n) mean-filtered one-hot labels s.

        Returns:
            (B, n) loss per voxel.
        """
        return nll(torch.log_softmax(x, dim=1), t).add_((soft - x).abs_().sum(dim=1), alpha=self.weight)

    def gradient(self, x: Tensor, grad: Tensor, t: Tensor, soft: Tensor) -> Tensor:
        """Gradient (softmax − onehot + w · sign(l − s)) · grad.

        Args:
            x: (B, C, n) float32 logits l of a chunk (not modified).
            grad: (B, 1, n) incoming gradient of each voxel's loss.
            t: (B, 1, n) int64 labels.
            soft: (B, C, n) mean-filtered one-hot labels s.

        Returns:
            (B, C, n) new tensor.
        """
        d = subtract_onehot_(torch.softmax(x, dim=1), t)
        return d.add_(torch.sub(x, soft).sign_(), alpha=self.weight).mul_(grad)


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
        """``{"sigma": σ}``, for logs and tables."""
        return {"sigma": self.sigma}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross entropy of ``logits`` against the SVLS-smoothed one-hot ``target``, computed in float32.

        Args:
            logits: (B, C, H, W) or (B, C, D, H, W) raw network outputs, any float dtype.
            target: (B, 1, *spatial) or (B, *spatial) integer labels.

        Returns:
            Scalar tensor: the mean over the non-ignored voxels (0 when every voxel is ignored).

        Raises:
            ValueError: the shapes do not fit (see :meth:`SegmentationLoss.prepare`), or the input is not 2D/3D.
        """
        logits, target, mask = self.prepare(logits, target)
        _check_spatial_dims(logits)
        num_classes = logits.shape[1]
        taps, centre_extra = svls_taps(self.sigma, logits.ndim - 2)
        soft = smoothed_onehot(_excluded_as_extra_class(target, mask, num_classes), num_classes, taps,
                               centre_extra=centre_extra, replicate=True, normalise=True)
        return masked_mean(voxelwise_loss(logits, _SoftTargetTerms(), soft), mask)


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
        """``{"alpha": α, "kernel_size": k}``, for logs and tables."""
        return {"alpha": self.alpha, "kernel_size": self.kernel_size}

    @float32_no_autocast
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """CE + α · L1 distance of ``logits`` to the mean-filtered one-hot ``target``, computed in float32.

        Args:
            logits: (B, C, H, W) or (B, C, D, H, W) raw network outputs, any float dtype.
            target: (B, 1, *spatial) or (B, *spatial) integer labels.

        Returns:
            Scalar tensor: the mean over the non-ignored voxels (0 when every voxel is ignored).

        Raises:
            ValueError: the shapes do not fit (see :meth:`SegmentationLoss.prepare`), or the input is not 2D/3D.
        """
        logits, target, mask = self.prepare(logits, target)
        _check_spatial_dims(logits)
        num_classes = logits.shape[1]
        taps = [1.0 / self.kernel_size] * self.kernel_size  # the mean filter is separable
        smoothed = smoothed_onehot(_excluded_as_extra_class(target, mask, num_classes), num_classes, taps)
        terms = _NACLTerms(self.alpha / num_classes)
        return masked_mean(voxelwise_loss(logits, terms, target, smoothed), mask)
