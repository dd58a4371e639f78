"""The calibration statistics of one case, computed while its probabilities are in memory, kept in a small file.

What the calibration step needs from a validation case is small: the sums behind every metric (a
:class:`~nnunet_mbls.calibration.metrics.CalibrationAccumulator`'s states, exact), the case's candidates for the
seeded temperature-fit subsample (:mod:`nnunet_mbls.calibration.subsample`), and a stratified sample of the
metric region from which the metrics after temperature scaling are estimated (T is known only once every case
has been seen; :mod:`nnunet_mbls.calibration.after_temperature`). :func:`case_statistics` computes them from the
network's logits in nnU-Net's own frame (transposed, cropped, resampled to the original spacing: what nnU-Net's
export turns into probabilities), so neither the probabilities of the whole image nor a ``.npz`` file are ever
made. The voxels are those the probability-file route evaluates: the reference is mapped into that frame, and
region voxels outside nnU-Net's crop box get the background probability 1 that nnU-Net writes there.

Per-case file size: the states (about 110 KiB + 360 bytes per class), at most
:data:`~nnunet_mbls.defaults.FIT_SAMPLE_BYTES` of fit sample and :data:`~nnunet_mbls.defaults.METRIC_SAMPLE_BYTES`
of metric sample: under 5 MB whatever the image size and the number of classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration.bins import bin_index
from nnunet_mbls.calibration.metrics import CalibrationAccumulator
from nnunet_mbls.calibration.regions import region_mask
from nnunet_mbls.calibration.subsample import SubsampleCandidates, case_seed
from nnunet_mbls.defaults import (BOUNDARY_WIDTH, FIT_REGION, FIT_SAMPLE_BYTES, METRIC_REGION, METRIC_SAMPLE_BYTES,
                                  N_BINS, SEED)
from nnunet_mbls.errors import InputError

#: format of the statistics files; a file of another version is refused with the command that rewrites it
STATISTICS_VERSION = 1
#: voxels of the cropped image handled at a time (C x this float32 temporaries)
SLAB_VOXELS = 2**18
#: half-octaves of 1 - confidence that split the top confidence bin into strata, down to 1 - p = 2**-24
_LAST_HALF_OCTAVE = 48


class StatisticsError(InputError):
    """A statistics file cannot be used (unreadable, another format version, other settings)."""


@dataclass(frozen=True)
class StatisticsSettings:
    """What the statistics of every case of a fold are computed with (picklable: sent to nnU-Net's export workers).

    ``num_classes``/``ignore_label``: the dataset's labels; ``region``: the voxels of the reported metrics;
    ``fit_region``: the voxels T is fitted on; ``seed``: the fit subsample's keys (per case, see
    :func:`~nnunet_mbls.calibration.subsample.case_seed`) and the metric sample's draw.
    """

    num_classes: int
    ignore_label: int | None = None
    region: str = METRIC_REGION
    fit_region: str = FIT_REGION
    n_bins: int = N_BINS
    boundary_width: int = BOUNDARY_WIDTH
    seed: int = SEED
    fit_sample_bytes: int = FIT_SAMPLE_BYTES
    metric_sample_bytes: int = METRIC_SAMPLE_BYTES

    @property
    def fit_capacity(self) -> int:
        """Fit-sample voxels kept per case: C float32 log-probabilities, a float64 key and an int16 label each."""
        return max(1, self.fit_sample_bytes // (4 * self.num_classes + 10))

    @property
    def metric_capacity(self) -> int:
        """Metric-sample voxels kept per case: C float32 log-probabilities, an int16 label and an int16 stratum."""
        return max(1, self.metric_sample_bytes // (4 * self.num_classes + 4))

    @property
    def num_strata(self) -> int:
        """Strata of the metric sample: (correct or not) x (top-label bin, the last one split by half-octaves)."""
        return 2 * (self.n_bins - 1 + _LAST_HALF_OCTAVE - _first_half_octave(self.n_bins) + 1)


def _first_half_octave(n_bins: int) -> int:
    return math.floor(2 * math.log2(n_bins))


@dataclass
class CaseStatistics:
    """One case's statistics (arrays as numpy; see the module docstring)."""

    case: str
    settings: StatisticsSettings
    #: a :class:`CalibrationAccumulator`'s states over the metric region, as trained (exact)
    metric_states: list[np.ndarray]
    #: the fit-region voxels with the ``fit_capacity`` smallest keys: keys (n,), log-probabilities (n, C), labels (n,)
    fit_keys: np.ndarray
    fit_log_probs: np.ndarray
    fit_target: np.ndarray
    #: fit-region voxels of the case, and the largest key kept (1.0: every voxel kept)
    fit_seen: int
    fit_threshold: float
    #: the metric sample: log-probabilities (n, C), labels (n,), stratum (n,), and every stratum's size (S,)
    sample_log_probs: np.ndarray
    sample_target: np.ndarray
    sample_stratum: np.ndarray
    strata_sizes: np.ndarray
    #: identifies the weights that predicted the case (see :func:`nnunet_mbls.calibration.evaluation.weights_id`)
    model_id: str = ""
    extra: dict = field(default_factory=dict)

    def accumulator(self) -> CalibrationAccumulator:
        """The metric region's accumulator, as trained."""
        accumulator = CalibrationAccumulator(self.settings.num_classes, self.settings.n_bins)
        accumulator.load_state_tensors([torch.from_numpy(np.asarray(s)) for s in self.metric_states])
        return accumulator

    def fit_candidates(self, threshold: float = 1.0) -> SubsampleCandidates:
        """The fit sample's rows with key <= ``threshold`` (see :func:`pooled_fit_threshold`), for
        :meth:`~nnunet_mbls.calibration.subsample.VoxelSubsampler.add_candidates`."""
        keep = self.fit_keys <= threshold
        return SubsampleCandidates(self.fit_keys[keep], self.fit_log_probs[keep],
                                   self.fit_target[keep].astype(np.int64), self.fit_seen)

    def save(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` (an uncompressed ``.npz``), atomically."""
        from nnunet_mbls.io import atomic_write

        arrays = {f"metric_state_{i}": s for i, s in enumerate(self.metric_states)}
        arrays.update(
            fit_keys=self.fit_keys, fit_log_probs=self.fit_log_probs, fit_target=self.fit_target,
            sample_log_probs=self.sample_log_probs, sample_target=self.sample_target,
            sample_stratum=self.sample_stratum, strata_sizes=self.strata_sizes,
            header=np.array(repr({"version": STATISTICS_VERSION, "case": self.case, "settings": asdict(self.settings),
                                  "fit_seen": self.fit_seen, "fit_threshold": self.fit_threshold,
                                  "model_id": self.model_id, "extra": self.extra})),
        )
        return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "CaseStatistics":
        """Read a file written by :meth:`save`.

        Raises:
            StatisticsError: the file cannot be read or has another format version.
        """
        import ast

        try:
            with np.load(path, allow_pickle=False) as data:
                header = ast.literal_eval(str(data["header"]))
                if header.get("version") != STATISTICS_VERSION:
                    raise StatisticsError(f"{path} has statistics format {header.get('version')}, this nnunet-mbls "
                                          f"reads {STATISTICS_VERSION}; run the validation again (nnunet-mbls calibrate)")
                states = [data[f"metric_state_{i}"] for i in range(len(CalibrationAccumulator.STATE_NAMES))]
                arrays = {k: data[k] for k in ("fit_keys", "fit_log_probs", "fit_target", "sample_log_probs",
                                               "sample_target", "sample_stratum", "strata_sizes")}
        except StatisticsError:
            raise
        except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same message
            raise StatisticsError(f"cannot read the statistics file {path} ({type(e).__name__}: {e}); run the "
                                  f"validation again (nnunet-mbls calibrate)") from e
        return cls(header["case"], StatisticsSettings(**header["settings"]), states, fit_seen=header["fit_seen"],
                   fit_threshold=header["fit_threshold"], model_id=header["model_id"], extra=header["extra"], **arrays)


def pooled_fit_threshold(statistics: Sequence[CaseStatistics]) -> float:
    """The largest key below which every case kept all its voxels: rows with a key <= it, pooled over the cases,
    are a uniform sample of all their fit-region voxels (each case kept its smallest keys)."""
    return min((s.fit_threshold for s in statistics), default=1.0)


class _RegionVoxels:
    """The voxels of a region of the reference, read from logits in nnU-Net's cropped frame, in a fixed order:
    those inside the crop box (C order of the cropped frame), then those outside it (background probability 1)."""

    def __init__(self, logits: Tensor, ref_t: np.ndarray, mask_t: np.ndarray, inside: tuple[slice, ...]):
        self.logits = logits
        self.mask_in = np.ascontiguousarray(mask_t[inside])
        outside = mask_t.copy()
        outside[inside] = False
        self.target_out = ref_t[outside].astype(np.int64)
        self.ref_in = ref_t[inside]
        self.n_in = int(self.mask_in.sum())
        self.n = self.n_in + self.target_out.size
        self._flat_in: np.ndarray | None = None

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(logits (C, n) float32, labels (n,) int64) chunk by chunk, in the voxel order."""
        shape = self.mask_in.shape
        rows = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
        for start in range(0, shape[0], rows):
            mask = self.mask_in[start : start + rows]
            if not mask.any():
                continue
            slab = self.logits[:, start : start + rows]
            yield slab[:, torch.from_numpy(mask)].float(), torch.from_numpy(self.ref_in[start : start + rows][mask].astype(np.int64))
        if self.target_out.size:
            yield self._outside_logits(self.target_out.size), torch.from_numpy(self.target_out)

    def _outside_logits(self, n: int) -> Tensor:
        logits = torch.full((self.logits.shape[0], n), -math.inf)
        logits[0] = 0.0
        return logits

    def gather(self, positions: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """Logits (C, k) float32 and labels (k,) int64 of the voxels at ``positions`` (sorted, in the voxel order)."""
        inside, outside = positions[positions < self.n_in], positions[positions >= self.n_in] - self.n_in
        if self._flat_in is None:
            self._flat_in = np.flatnonzero(self.mask_in)
        flat = self._flat_in[inside]
        logits = self.logits.reshape(self.logits.shape[0], -1)[:, torch.from_numpy(flat)].float()
        target = self.ref_in.reshape(-1)[flat].astype(np.int64)
        if outside.size:
            logits = torch.cat([logits, self._outside_logits(outside.size)], dim=1)
            target = np.concatenate([target, self.target_out[outside]])
        return logits, target


def case_statistics(case: str, logits: Tensor | np.ndarray, ref: np.ndarray, properties: Mapping,
                    transpose_forward: Sequence[int], settings: StatisticsSettings) -> CaseStatistics:
    """The statistics of one case.

    Args:
        case: the case name (seeds its keys).
        logits: (C, *cropped) the network's logits resampled to the original spacing, in nnU-Net's transposed
            frame and inside its crop box (what ``export_prediction_from_logits`` turns into probabilities), any
            float dtype; log-probabilities work as well.
        ref: (*spatial) integer reference labels in the original axis order (as nnU-Net's reader returns them).
        properties: the case's nnU-Net properties (``bbox_used_for_cropping``, ``shape_before_cropping``).
        transpose_forward: the plans' ``transpose_forward``.
        settings: the regions, bins, seed and sample sizes.

    Returns:
        The :class:`CaseStatistics`.

    Raises:
        InputError: the logits, the reference and the properties do not fit together.
    """
    logits = torch.as_tensor(logits)
    order = [int(a) for a in transpose_forward]
    ref_t = ref.transpose(order)
    box = [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]]
    inside = tuple(slice(a, b) for a, b in box)
    if tuple(ref_t.shape) != tuple(int(s) for s in properties["shape_before_cropping"]) or \
            tuple(ref_t[inside].shape) != tuple(logits.shape[1:]) or logits.shape[0] != settings.num_classes:
        raise InputError(f"case {case}: logits {tuple(logits.shape)} (crop box {box}) do not fit the reference "
                         f"{tuple(ref.shape)} transposed by {order} and {settings.num_classes} classes")
    box_original = [box[order.index(axis)] for axis in range(len(order))]

    def mask_of(region: str) -> np.ndarray:
        mask = region_mask(ref, region, settings.ignore_label, box_original, settings.boundary_width)
        return mask.transpose(order)

    metric_voxels = _RegionVoxels(logits, ref_t, mask_of(settings.region), inside)
    fit_voxels = metric_voxels if settings.fit_region == settings.region else \
        _RegionVoxels(logits, ref_t, mask_of(settings.fit_region), inside)
    accumulator, strata = _metric_pass(metric_voxels, settings)
    rng = np.random.default_rng(case_seed(settings.seed + 1, case))
    positions = _stratified_positions(strata, settings, rng)
    sample_logits, sample_target = metric_voxels.gather(positions)
    fit_keys, fit_positions = _smallest_keys(fit_voxels.n, settings.fit_capacity, case_seed(settings.seed, case))
    order_by_position = np.argsort(fit_positions)
    fit_logits, fit_target = fit_voxels.gather(fit_positions[order_by_position])
    return CaseStatistics(
        case, settings, [s.numpy() for s in accumulator.state_tensors()],
        fit_keys=fit_keys[order_by_position], fit_log_probs=torch.log_softmax(fit_logits, 0).T.contiguous().numpy(),
        fit_target=fit_target.astype(np.int16), fit_seen=fit_voxels.n,
        fit_threshold=float(fit_keys.max()) if fit_voxels.n > settings.fit_capacity else 1.0,
        sample_log_probs=torch.log_softmax(sample_logits, 0).T.contiguous().numpy(),
        sample_target=sample_target.astype(np.int16), sample_stratum=strata[positions],
        strata_sizes=np.bincount(strata, minlength=settings.num_strata).astype(np.int64),
    )


def stratum_of(probs: Tensor, target: Tensor, n_bins: int) -> Tensor:
    """Stratum of each voxel (n,) int16 from probabilities (C, n) and labels (n,): the top-label bin (the last
    one split by half-octaves of 1 - confidence), doubled for the correct voxels (the prediction is the first
    maximum, as :class:`CalibrationAccumulator` counts hits)."""
    conf, predicted = probs.max(dim=0)
    first = _first_half_octave(n_bins)
    half_octave = torch.floor(-2 * torch.log2((1 - conf.double()).clamp(min=2.0**-_LAST_HALF_OCTAVE)))
    last = half_octave.clamp(first, _LAST_HALF_OCTAVE).long() - first + n_bins - 1
    top = bin_index(conf, n_bins)
    stratum = torch.where(top < n_bins - 1, top, last)
    per_correctness = n_bins - 1 + _LAST_HALF_OCTAVE - first + 1
    return (stratum + per_correctness * (predicted == target)).to(torch.int16)


def _metric_pass(voxels: _RegionVoxels, settings: StatisticsSettings) -> tuple[CalibrationAccumulator, np.ndarray]:
    accumulator = CalibrationAccumulator(settings.num_classes, settings.n_bins)
    strata = np.empty(voxels.n, dtype=np.int16)
    start = 0
    for logits, target in voxels.chunks():
        probs = torch.softmax(logits, dim=0)
        accumulator.update(probs, target)
        strata[start : start + target.numel()] = stratum_of(probs, target, settings.n_bins).numpy()
        start += target.numel()
    return accumulator, strata


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


def _stratified_positions(strata: np.ndarray, settings: StatisticsSettings, rng: np.random.Generator) -> np.ndarray:
    """Positions (sorted) of a stratified sample without replacement of the voxels, allocated by :func:`allocate`."""
    sizes = np.bincount(strata, minlength=settings.num_strata)
    taken = allocate(sizes, settings.metric_capacity)
    if (taken == sizes).all():
        return np.arange(strata.size)
    by_stratum = np.argsort(strata, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    chosen = [by_stratum[start + rng.choice(size, k, replace=False, shuffle=False)] if k < size else
              by_stratum[start : start + size] for start, size, k in zip(starts, sizes, taken) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def _smallest_keys(n: int, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
