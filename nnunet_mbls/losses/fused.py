"""Voxel-wise losses evaluated chunk by chunk with a hand-written gradient.

A loss that is a function of each voxel's logits and label alone (cross entropy plus a penalty) is
described by a :class:`VoxelTerms` object (its per-voxel value and its gradient) and evaluated by
:func:`voxelwise_loss`, one autograd Function that walks over chunks of voxels:

* autograd through log_softmax/max/clamp/mul would keep several (B, C, *spatial) intermediates alive
  until backward and build one (B, C, *spatial) gradient per term. Here only the logits (which the
  caller holds anyway) and the target are saved, every temporary has about ``CHUNK_ELEMENTS``
  elements, and the only full-size tensor built is the returned gradient;
* on the CPU a fresh large tensor costs page faults that take longer than the arithmetic on it
  (allocating 48 MiB costs ~10x an elementwise pass over it); small chunk temporaries are reused by the
  allocator and stay in cache. On CUDA the whole tensor is one chunk: the caching allocator makes big
  temporaries cheap there, and fewer kernel launches matter more.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

CHUNK_ELEMENTS = 2**18  #: elements of a (B, C, voxels) block processed at once on the CPU (1 MiB in float32)


class VoxelTerms:
    """A per-voxel loss and its gradient on chunks of voxels.

    Arguments of both methods: logits ``x`` (B, C, n) float32, which must not be modified, and, last,
    the chunks of the targets given to :func:`voxelwise_loss`, each as (B, k, n): label maps as
    (B, 1, n) int64, soft targets as (B, C, n).
    """

    def value(self, x: Tensor, *targets: Tensor) -> Tensor:
        """Per-voxel loss (B, n)."""
        raise NotImplementedError

    def gradient(self, x: Tensor, grad: Tensor, *targets: Tensor) -> Tensor:
        """d(Σ_v grad_v · value_v) / d x as a new (B, C, n) tensor; grad (B, 1, n)."""
        raise NotImplementedError


def voxel_chunks(flat: Tensor) -> list[slice]:
    """Slices of the voxel axis of ``flat`` (B, C, V) such that a block holds about CHUNK_ELEMENTS elements."""
    batch, classes, voxels = flat.shape
    width = voxels if flat.is_cuda else max(1, CHUNK_ELEMENTS // (batch * classes))
    return [slice(start, start + width) for start in range(0, voxels, width)]


def _flat(t: Tensor, voxels: int) -> Tensor:
    return t.reshape(t.shape[0], -1, voxels)


class _VoxelwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, terms: VoxelTerms, *targets: Tensor) -> Tensor:
        ctx.save_for_backward(logits, *targets)
        ctx.terms = terms
        x = logits.reshape(logits.shape[0], logits.shape[1], -1)
        flat_targets = [_flat(t, x.shape[2]) for t in targets]
        out = x.new_empty(x.shape[0], x.shape[2])
        for s in voxel_chunks(x):
            out[:, s] = terms.value(x[:, :, s], *(t[:, :, s] for t in flat_targets))
        return out.view(logits.shape[:1] + logits.shape[2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, *targets = ctx.saved_tensors
        x = logits.reshape(logits.shape[0], logits.shape[1], -1)
        flat_targets = [_flat(t, x.shape[2]) for t in targets]
        g = _flat(grad, x.shape[2])
        out = torch.empty_like(x)
        for s in voxel_chunks(x):
            out[:, :, s] = ctx.terms.gradient(x[:, :, s], g[:, :, s], *(t[:, :, s] for t in flat_targets))
        return (out.view(logits.shape), None) + (None,) * len(targets)


def voxelwise_loss(logits: Tensor, terms: VoxelTerms, *targets: Tensor) -> Tensor:
    """Per-voxel loss map of ``terms``: logits (B, C, *sp) float, targets (B, *sp) label maps or
    (B, C, *sp) soft targets (no gradient flows into them) -> (B, *sp)."""
    return _VoxelwiseLoss.apply(logits, terms, *targets)


def onehot(t: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, n) integer labels -> (B, C, n) one-hot of ``dtype``, as a broadcast float comparison (several
    times faster on the CPU than scatter/gather along the class axis)."""
    classes = torch.arange(num_classes, device=t.device, dtype=dtype).view(1, -1, 1)
    out = torch.empty((t.shape[0], num_classes, t.shape[2]), dtype=dtype, device=t.device)
    return torch.eq(t.to(dtype), classes, out=out)


def subtract_onehot_(grad: Tensor, t: Tensor) -> Tensor:
    """grad − onehot(t) in place, e.g. softmax − onehot = the cross-entropy gradient: (B, C, n), (B, 1, n)."""
    return grad.sub_(onehot(t, grad.shape[1], grad.dtype))


def nll(log_p: Tensor, t: Tensor) -> Tensor:
    """−log_p[t] per voxel: (B, C, n), (B, 1, n) -> (B, n)."""
    return F.nll_loss(log_p, t.squeeze(1), reduction="none")
