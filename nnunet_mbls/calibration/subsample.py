"""The bounded, seeded, uniform voxel subsample a temperature (or any per-voxel map) is fitted on.

Cases stream in one at a time (in worker processes, in any order); each voxel gets a uniform key drawn from a
generator seeded by (seed, case name), and the ``max_voxels`` smallest keys of all cases are kept, so the
sample is the same whatever the number of workers and the order of the cases.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration._inputs import CHUNK_VOXELS, check_positive_int, flatten_case, iter_chunks
from nnunet_mbls.defaults import MAX_VOXELS, SEED


class VoxelSubsampler:
    """Bounded uniform sample of voxels across many cases streamed one by one, for :func:`fit_temperature`.

    Bottom-k ("priority") reservoir sampling: every included voxel gets a uniform random key from a
    generator seeded with ``seed``, and the ``max_voxels`` voxels with the smallest keys are kept. The
    result is a uniform sample without replacement of all voxels seen so far (so large cases contribute
    proportionally more, as in a pooled fit), deterministic for a seed and the same sequence of ``add``
    calls. Candidates are merged lazily: a voxel enters only if its key is below the ``max_voxels``-th
    smallest key at the last merge, and the smallest ``max_voxels`` are selected again only when twice
    that many rows are held (and by :meth:`arrays`), so a long stream costs few selections.
    Memory: at most 2 x max_voxels x (C float32 + int64 label + float64 key), plus one chunk of a case.
    """

    def __init__(self, max_voxels: int = MAX_VOXELS, seed: int = SEED) -> None:
        self.max_voxels = check_positive_int("max_voxels", max_voxels, MAX_VOXELS)
        self.chunk_voxels = CHUNK_VOXELS
        self.n_seen = 0
        self._gen = torch.Generator().manual_seed(int(seed))
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (keys (n,), log_probs (n, C), target (n,))
        self._rows = 0  # rows held in _parts
        self._threshold = math.inf  # keys must be below it to enter
        self._num_classes: int | None = None

    def __len__(self) -> int:
        return min(self._rows, self.max_voxels)

    def add(
        self, probs: Tensor | np.ndarray, target: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None
    ) -> None:
        """Offer the voxels of one case to the sample.

        A bad chunk rejects the whole case: the sample and the generator are restored to their state before
        the call, so the case can be offered again once repaired.

        Args:
            probs: (C, *spatial) probabilities.
            target: (*spatial) integer labels in [0, C) wherever ``mask`` is True.
            mask: (*spatial) bool, voxels to offer; None offers all.

        Raises:
            ValueError: ``probs`` has another number of classes than earlier cases; the shapes or dtypes do not
                fit (see :func:`~nnunet_mbls.calibration._inputs.flatten_case`); a probability is non-finite or
                outside [0, 1], or a label outside [0, C), among the offered voxels.
        """
        p_flat, t_flat, m_flat = flatten_case(probs, target, mask)
        if self._num_classes is not None and p_flat.shape[0] != self._num_classes:
            raise ValueError(f"probs has {p_flat.shape[0]} classes but earlier cases had {self._num_classes}; "
                             "use one subsampler per dataset")
        saved = (list(self._parts), self._rows, self._threshold, self.n_seen, self._gen.get_state())
        try:
            for p, t in iter_chunks(p_flat, t_flat, m_flat, self.chunk_voxels):
                self._offer(p, t)
        except BaseException:  # a bad chunk rejects the whole case: restore the sample and the generator
            self._parts, self._rows, self._threshold, self.n_seen = saved[:4]
            self._gen.set_state(saved[4])
            raise
        if self._rows:
            self._num_classes = p_flat.shape[0]

    def _offer(self, p: Tensor, t: Tensor) -> None:
        """Add the candidates of one checked chunk, p (C, n) and t (n,) int64."""
        keys = torch.rand(t.numel(), generator=self._gen, dtype=torch.float64)
        self.n_seen += t.numel()
        index = self._entering(keys)
        if index is not None:
            keys, p, t = keys[index], p.index_select(1, index.to(p.device)), t[index.to(t.device)]
        self._take(keys, p.T.float().log().cpu(), t.cpu())  # log: -inf where p == 0

    def _entering(self, keys: Tensor) -> Tensor | None:
        """Indices of the keys below the max_voxels-th smallest so far (None: all may enter)."""
        return torch.nonzero(keys < self._threshold).squeeze(1) if self._threshold < math.inf else None

    def _take(self, keys: Tensor, logp: Tensor, target: Tensor) -> None:
        """Hold rows (keys (n,) float64, log_probs (n, C), target (n,)); select again when twice max_voxels are held."""
        self._parts.append((keys, logp, target))
        self._rows += keys.numel()
        if self._rows > 2 * self.max_voxels:
            self._merge()

    def _merge(self) -> None:
        """Concatenate the parts; keep the max_voxels rows with the smallest keys (sorted by key) if there are more."""
        keys, logp, target = (torch.cat(columns) for columns in zip(*self._parts))
        if keys.numel() > self.max_voxels:
            index = torch.topk(keys, self.max_voxels, largest=False).indices
            keys, logp, target = keys[index], logp[index], target[index]
            self._threshold = float(keys.max())
        self._parts, self._rows = [(keys, logp, target)], keys.numel()

    def arrays(self) -> tuple[Tensor, Tensor]:
        """The sample, as the inputs of :func:`~nnunet_mbls.calibration.temperature.fit_temperature`.

        Returns:
            ``log_probs`` (N, C) float32 (log of the given probabilities, -inf where p = 0) and ``target``
            (N,) int64, N = min(voxels offered, ``max_voxels``), sorted by key when more were offered.

        Raises:
            ValueError: no voxel was added yet.
        """
        if not self._parts:
            raise ValueError("no voxel was added; call add() with at least one non-empty case first")
        self._merge()
        _, logp, target = self._parts[0]
        return logp, target

    def candidates(self) -> SubsampleCandidates:
        """The rows held with their keys, for :meth:`add_candidates` of another subsampler (e.g. in another
        process).

        Returns:
            :class:`SubsampleCandidates` of numpy arrays: at most ``max_voxels`` rows, sorted by key when more
            were offered, and ``n_seen``; empty arrays when nothing is held.
        """
        if not self._rows:
            c = self._num_classes or 0
            return SubsampleCandidates(np.empty(0), np.empty((0, c), np.float32), np.empty(0, np.int64), self.n_seen)
        self._merge()
        keys, logp, target = self._parts[0]
        return SubsampleCandidates(keys.numpy(), logp.numpy(), target.numpy(), self.n_seen)

    def add_candidates(self, candidates: SubsampleCandidates) -> None:
        """Merge the rows of another subsampler (:meth:`candidates`) with the keys they were drawn with.

        The result is the ``max_voxels`` rows with the smallest keys of everything offered to either, so a
        subsampler per case merged in any order keeps the same voxels as one fed every case (with the same keys).

        Args:
            candidates: keys (n,), log_probs (n, C), target (n,) and n_seen, as returned by :meth:`candidates`
                or :func:`case_candidates`; ``n_seen`` is added to this subsampler's count even when n = 0.

        Raises:
            ValueError: the arrays do not have the shapes (n,), (n, C), (n,), or C differs from that of
                earlier cases.
        """
        keys, logp, target = (torch.as_tensor(a) for a in candidates[:3])
        if keys.ndim != 1 or logp.ndim != 2 or tuple(target.shape) != tuple(keys.shape) or logp.shape[0] != keys.numel():
            raise ValueError(f"candidates must be keys (n,), log_probs (n, C), target (n,), got shapes "
                             f"{tuple(keys.shape)}, {tuple(logp.shape)}, {tuple(target.shape)}")
        self.n_seen += int(candidates.n_seen)
        if not keys.numel():
            return
        if self._num_classes is not None and logp.shape[1] != self._num_classes:
            raise ValueError(f"candidates have {logp.shape[1]} classes but earlier cases had {self._num_classes}; "
                             "use one subsampler per dataset")
        index = self._entering(keys)
        if index is not None:
            keys, logp, target = keys[index], logp[index], target[index]
        self._num_classes = logp.shape[1]
        self._take(keys.to(torch.float64), logp.float(), target.long())


class SubsampleCandidates(NamedTuple):
    """Rows of a :class:`VoxelSubsampler` with their keys: keys (n,) float64, log_probs (n, C) float32, target (n,)
    int64, and n_seen, the number of voxels they were chosen from."""

    keys: np.ndarray
    log_probs: np.ndarray
    target: np.ndarray
    n_seen: int


def case_seed(seed: int, case: str) -> int:
    """The seed of one case's sampling keys: the first 63 bits of sha256("<seed>:<case>").

    Depends on the seed and the case's name only, so a case's keys are the same whichever cases come with it,
    in whatever order, in whichever process (see :func:`case_candidates`).

    Args:
        seed: the subsample's seed (converted with ``int``).
        case: the case name.

    Returns:
        A non-negative int below 2**63.
    """
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{case}".encode()).digest()[:8], "little") >> 1


def case_candidates(case: str, probs: np.ndarray | Tensor, target: np.ndarray | Tensor,
                    mask: np.ndarray | Tensor | None, *, max_voxels: int, seed: int) -> SubsampleCandidates:
    """The candidates of one case for a temperature-fit subsample with per-case keys.

    A :class:`VoxelSubsampler` seeded with :func:`case_seed` ``(seed, case)`` takes the case's voxels and keeps
    its ``max_voxels`` smallest keys; :meth:`VoxelSubsampler.add_candidates` of every case then gives the
    ``max_voxels`` voxels with the smallest keys of all cases: a uniform sample without replacement (the keys of
    all voxels are i.i.d. uniform), deterministic for ``seed`` and the case names, and independent of the order
    the cases are merged in and of the process that computed them. A plain function (picklable) for worker
    processes, e.g. with ``functools.partial(case_candidates, max_voxels=..., seed=...)``.

    Args:
        case: the case name (part of its keys' seed).
        probs: (C, *spatial) probabilities.
        target: (*spatial) integer labels.
        mask: (*spatial) bool voxels to offer, or None for all.
        max_voxels: the size of the final subsample, >= 1.
        seed: the subsample's seed.

    Returns:
        :class:`SubsampleCandidates` of the case; with no voxel, empty arrays whose log_probs still have C
        columns (for the shape check of :meth:`VoxelSubsampler.add_candidates`).

    Raises:
        ValueError: ``max_voxels`` is not an integer >= 1, or the case's arrays are invalid (see
            :meth:`VoxelSubsampler.add`).
    """
    subsample = VoxelSubsampler(max_voxels=max_voxels, seed=case_seed(seed, case))
    subsample.add(torch.as_tensor(probs), torch.as_tensor(target), None if mask is None else torch.as_tensor(mask))
    out = subsample.candidates()
    if out.log_probs.shape[1] == 0:  # no voxel: keep the class count for the shape check of add_candidates
        out = out._replace(log_probs=np.empty((0, int(probs.shape[0])), np.float32))
    return out
