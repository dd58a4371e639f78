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
        """Per-voxel loss of one chunk.

        Args:
            x: (B, C, n) float32 logits (must not be modified).
            *targets: the chunks of the targets, each (B, k, n): label maps (B, 1, n) int64, soft targets (B, C, n).

        Returns:
            (B, n) loss per voxel.

        Raises:
            NotImplementedError: always; subclasses implement it.
        """
        raise NotImplementedError

    def gradient(self, x: Tensor, grad: Tensor, *targets: Tensor) -> Tensor:
        """d(Σ_v grad_v · value_v) / d x of one chunk.

        Args:
            x: (B, C, n) float32 logits (must not be modified).
            grad: (B, 1, n) incoming gradient of each voxel's loss.
            *targets: the chunks of the targets, as in :meth:`value`.

        Returns:
            (B, C, n) new tensor.

        Raises:
            NotImplementedError: always; subclasses implement it.
        """
        raise NotImplementedError


def voxel_chunks(flat: Tensor) -> list[slice]:
    """Slices of the voxel axis such that a block holds about ``CHUNK_ELEMENTS`` elements.

    Args:
        flat: (B, C, V) logits with the spatial axes flattened.

    Returns:
        Slices covering 0..V in order: blocks of max(1, CHUNK_ELEMENTS // (B * C)) voxels on the CPU, one
        slice of all V voxels on CUDA.
    """
    batch, classes, voxels = flat.shape
    width = voxels if flat.is_cuda else max(1, CHUNK_ELEMENTS // (batch * classes))
    return [slice(start, start + width) for start in range(0, voxels, width)]


def _flat(t: Tensor, voxels: int) -> Tensor:
    return t.reshape(t.shape[0], -1, voxels)


class _VoxelwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, terms: VoxelTerms, *targets: Tensor) -> Tensor:
        """Per-voxel loss map, chunk by chunk; saves only ``logits`` and ``targets`` for backward.

        Args:
            ctx: autograd's context.
            logits: (B, C, *spatial) float32 logits.
            terms: the per-voxel value and gradient formulas.
            *targets: (B, *spatial) label maps or (B, C, *spatial) soft targets.

        Returns:
            (B, *spatial) loss per voxel.
        """
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
        """Gradient with respect to the logits, chunk by chunk, from ``terms.gradient``.

        Args:
            ctx: autograd's context, holding the saved logits, targets and terms.
            grad: (B, *spatial) incoming gradient of the loss map.

        Returns:
            ((B, C, *spatial) gradient of the logits, None for ``terms``, None for every target): no
            gradient flows into the targets.
        """
        logits, *targets = ctx.saved_tensors
        x = logits.reshape(logits.shape[0], logits.shape[1], -1)
        flat_targets = [_flat(t, x.shape[2]) for t in targets]
        g = _flat(grad, x.shape[2])
        out = torch.empty_like(x)
        for s in voxel_chunks(x):
            out[:, :, s] = ctx.terms.gradient(x[:, :, s], g[:, :, s], *(t[:, :, s] for t in flat_targets))
        return (out.view(logits.shape), None) + (None,) * len(targets)


def voxelwise_loss(logits: Tensor, terms: VoxelTerms, *targets: Tensor) -> Tensor:
    """Per-voxel loss map of ``terms``, evaluated chunk by chunk with its hand-written gradient.

    Args:
        logits: (B, C, *spatial) float logits.
        terms: the per-voxel value and gradient formulas (:class:`VoxelTerms`).
        *targets: (B, *spatial) label maps or (B, C, *spatial) soft targets; no gradient flows into them.

    Returns:
        (B, *spatial) loss per voxel.
    """
    return _VoxelwiseLoss.apply(logits, terms, *targets)


def onehot(t: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """One-hot encoding of integer labels as a broadcast float comparison.

    The comparison is several times faster on the CPU than scatter/gather along the class axis.

    Args:
        t: (B, 1, n) integer labels.
        num_classes: C, the length of the class axis.
        dtype: dtype of the result (and of the comparison).

    Returns:
        (B, C, n) one-hot of ``dtype``.
    """
    classes = torch.arange(num_classes, device=t.device, dtype=dtype).view(1, -1, 1)
    out = torch.empty((t.shape[0], num_classes, t.shape[2]), dtype=dtype, device=t.device)
    return torch.eq(t.to(dtype), classes, out=out)


def subtract_onehot_(grad: Tensor, t: Tensor) -> Tensor:
    """grad − onehot(t) in place, e.g. softmax − onehot = the cross-entropy gradient.

    Args:
        grad: (B, C, n) float tensor, modified in place.
        t: (B, 1, n) integer labels.

    Returns:
        ``grad`` itself, (B, C, n).
    """
    return grad.sub_(onehot(t, grad.shape[1], grad.dtype))


def nll(log_p: Tensor, t: Tensor) -> Tensor:
    """−log_p[t] per voxel.

    Args:
        log_p: (B, C, n) log-probabilities.
        t: (B, 1, n) int64 labels.

    Returns:
        (B, n) negative log-likelihood per voxel.
    """
    return F.nll_loss(log_p, t.squeeze(1), reduction="none")
