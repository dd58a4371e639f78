"""Voxels of a region read from logits in nnU-Net's cropped, transposed frame, and the two samplings of the streamed
statistics: the smallest uniform keys (temperature-fit sample) and a stratified sample (metrics after T)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration.bins import bin_index

#: voxels of the cropped image handled at a time (C x this float32 temporaries)
SLAB_VOXELS = 2**18
#: half-octaves of 1 - confidence that split the top confidence bin into strata, down to 1 - p = 2**-24
LAST_HALF_OCTAVE = 48


def first_half_octave(n_bins: int) -> int:
    """The half-octave of 1 - confidence where the top bin (confidence > 1 - 1/n_bins) starts."""
    return math.floor(2 * math.log2(n_bins))


def num_strata(n_bins: int) -> int:
    """Strata of a stratified sample: (correct or not) x (top-label bin, the last one split by half-octaves)."""
    return 2 * (n_bins - 1 + LAST_HALF_OCTAVE - first_half_octave(n_bins) + 1)


class RegionVoxels:
    """The voxels of a region of the reference, read from logits in nnU-Net's cropped frame, in a fixed order:
    those inside the crop box (C order of the cropped frame), then those outside it (background probability 1)."""

    def __init__(self, logits: Tensor, ref_t: np.ndarray, mask_t: np.ndarray, inside: tuple[slice, ...]):
        self.logits = logits
        self.mask_in = np.ascontiguousarray(mask_t[inside])
        self.ref_in = ref_t[inside]
        self.full = bool(self.mask_in.all())  # every voxel of the box (region "all" without ignore label): no indexing
        self.n_in = self.mask_in.size if self.full else int(np.count_nonzero(self.mask_in))
        self.inside = inside
        whole_image = all(s.start == 0 and s.stop == n for s, n in zip(inside, mask_t.shape))
        self.outside: np.ndarray | None = None  # the region's voxels outside the box, where there are any
        if whole_image or int(np.count_nonzero(mask_t)) == self.n_in:
            self.target_out = np.empty(0, np.int64)
        else:
            self.outside = mask_t.copy()
            self.outside[inside] = False
            self.target_out = ref_t[self.outside].astype(np.int64)
        self.n = self.n_in + self.target_out.size
        self._flat_in: np.ndarray | None = None

    def membership(self, mask_t: np.ndarray) -> np.ndarray:
        """(n,) bool, in the voxel order: which of these voxels ``mask_t`` (a sub-region, transposed frame) holds."""
        inside = mask_t[self.inside].reshape(-1) if self.full else mask_t[self.inside][self.mask_in]
        return inside if self.outside is None else np.concatenate([inside, mask_t[self.outside]])

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits (C, n) float32, labels (n,) int64) chunk by chunk, in the voxel order."""
        shape = self.mask_in.shape
        rows = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
        for start in range(0, shape[0], rows):
            slab, ref = self.logits[:, start : start + rows], self.ref_in[start : start + rows]
            if self.full:
                yield slab.reshape(slab.shape[0], -1).float(), torch.from_numpy(ref.reshape(-1).astype(np.int64))
                continue
            mask = self.mask_in[start : start + rows]
            if mask.any():
                yield slab[:, torch.from_numpy(mask)].float(), torch.from_numpy(ref[mask].astype(np.int64))
        if self.target_out.size:
            yield self._outside_logits(self.target_out.size), torch.from_numpy(self.target_out)

    def _outside_logits(self, n: int) -> Tensor:
        logits = torch.full((self.logits.shape[0], n), -math.inf)
        logits[0] = 0.0
        return logits

    def gather(self, positions: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """Logits (C, k) float32 and labels (k,) int64 of the voxels at ``positions`` (sorted, in the voxel order)."""
        inside, outside = positions[positions < self.n_in], positions[positions >= self.n_in] - self.n_in
        if self.full:
            flat = inside
        else:
            if self._flat_in is None:
                self._flat_in = np.flatnonzero(self.mask_in)
            flat = self._flat_in[inside]
        logits = self.logits.reshape(self.logits.shape[0], -1)[:, torch.from_numpy(flat)].float()
        target = self.ref_in.reshape(-1)[flat].astype(np.int64)
        if outside.size:
            logits = torch.cat([logits, self._outside_logits(outside.size)], dim=1)
            target = np.concatenate([target, self.target_out[outside]])
        return logits, target


def stratum_of(probs: Tensor, target: Tensor, n_bins: int) -> Tensor:
    """Stratum of each voxel (n,) int16 from probabilities (C, n) and labels (n,): the top-label bin (the last
    one split by half-octaves of 1 - confidence), doubled for the correct voxels (the prediction is the first
    maximum, as :class:`CalibrationAccumulator` counts hits)."""
    conf, predicted = probs.max(dim=0)
    first = first_half_octave(n_bins)
    half_octave = torch.floor(-2 * torch.log2((1 - conf.double()).clamp(min=2.0**-LAST_HALF_OCTAVE)))
    last = half_octave.clamp(first, LAST_HALF_OCTAVE).long() - first + n_bins - 1
    top = bin_index(conf, n_bins)
    stratum = torch.where(top < n_bins - 1, top, last)
    per_correctness = n_bins - 1 + LAST_HALF_OCTAVE - first + 1
    return (stratum + per_correctness * (predicted == target)).to(torch.int16)


def allocate(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Sample size per stratum: equal shares of ``capacity``, a stratum smaller than its share taken whole and
    the rest shared again (so every voxel is kept when the region has at most ``capacity`` voxels)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    taken = np.zeros_like(sizes)
    open_ = sizes > 0
    budget = int(capacity)
    while open_.any() and budget > 0:
        share = budget // int(open_.sum())
        small = open_ & (sizes <= share)
        if not small.any():
            taken[open_] = share
            for index in np.flatnonzero(open_)[: budget - share * int(open_.sum())]:
                taken[index] += 1  # the remainder, one voxel each to the first open strata
            break
        taken[small] = sizes[small]
        budget -= int(sizes[small].sum())
        open_ &= ~small
    return taken


def stratified_positions(strata: np.ndarray, n_bins: int, capacity: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (sorted) of a stratified sample without replacement of the voxels, allocated by :func:`allocate`."""
    sizes = np.bincount(strata, minlength=num_strata(n_bins))
    taken = allocate(sizes, capacity)
    if (taken == sizes).all():
        return np.arange(strata.size)
    by_stratum = np.argsort(strata, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    chosen = [by_stratum[start + rng.choice(size, k, replace=False, shuffle=False)] if k < size else
              by_stratum[start : start + size] for start, size, k in zip(starts, sizes, taken) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def smallest_keys(n: int, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform keys for n voxels (a float64 generator seeded with ``seed``, drawn in chunks) and the positions of
    the ``capacity`` smallest: (keys, positions), memory bounded by 2 x capacity + one chunk."""
    generator = torch.Generator().manual_seed(int(seed))
    keys_held, positions_held, held, threshold = [], [], 0, math.inf
    chunk = max(2**20, capacity)
    for start in range(0, n, chunk):
        keys = torch.rand(min(chunk, n - start), generator=generator, dtype=torch.float64)
        index = torch.nonzero(keys < threshold).squeeze(1) if threshold < math.inf else torch.arange(keys.numel())
        keys_held.append(keys[index])
        positions_held.append(index + start)
        held += index.numel()
        if held > 2 * capacity:
            keys_held, positions_held, threshold = _keep_smallest(keys_held, positions_held, capacity)
            held = capacity
    if not keys_held:
        return np.empty(0), np.empty(0, np.int64)
    keys_held, positions_held, _ = _keep_smallest(keys_held, positions_held, capacity)
    return keys_held[0].numpy(), positions_held[0].numpy()


def _keep_smallest(keys: list[Tensor], positions: list[Tensor], capacity: int):
    keys_all, positions_all = torch.cat(keys), torch.cat(positions)
    threshold = math.inf
    if keys_all.numel() > capacity:
        index = torch.topk(keys_all, capacity, largest=False).indices
        keys_all, positions_all = keys_all[index], positions_all[index]
        threshold = float(keys_all.max())
    return [keys_all], [positions_all], threshold
