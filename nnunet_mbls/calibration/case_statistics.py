"""The calibration statistics of one case, computed while its probabilities are in memory, kept in a small file.

What the calibration step needs from a validation case is small: the sums behind every metric (a
:class:`~nnunet_mbls.calibration.metrics.CalibrationAccumulator`'s states, exact), the case's candidates for the
seeded temperature-fit subsample (:mod:`nnunet_mbls.calibration.subsample`), and a stratified sample of the
metric region from which the metrics after temperature scaling are estimated (T is known only once every case
has been seen; :mod:`nnunet_mbls.calibration.after_temperature`). Given the exported segmentation, the same for
the regions of the benchmark's per-case scores (:data:`QC_REGIONS`: mean entropy over the predicted foreground and
the predicted boundary band, ECE over the reference boundary band). :func:`case_statistics` computes them from the
network's logits in nnU-Net's own frame (transposed, cropped, resampled to the original spacing: what nnU-Net's
export turns into probabilities), so neither the probabilities of the whole image nor a ``.npz`` file are ever
made. The voxels are those the probability-file route evaluates: the reference is mapped into that frame, and
region voxels outside nnU-Net's crop box get the background probability 1 that nnU-Net writes there.

Per-case file size: two accumulators' states (about 110 KiB + 360 bytes per class each), at most
:data:`~nnunet_mbls.defaults.FIT_SAMPLE_BYTES` of fit sample, :data:`~nnunet_mbls.defaults.METRIC_SAMPLE_BYTES` of
metric sample and :data:`~nnunet_mbls.defaults.QC_SAMPLE_BYTES` per score region: under 5 MB whatever the image size
and the number of classes.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration.metrics import CalibrationAccumulator
from nnunet_mbls.calibration.region_voxels import (RegionVoxels, num_strata, smallest_keys, stratified_positions,
                                                   stratum_of)
from nnunet_mbls.calibration.regions import region_mask
from nnunet_mbls.calibration.subsample import SubsampleCandidates, case_seed
from nnunet_mbls.defaults import (BOUNDARY_WIDTH, FIT_REGION, FIT_SAMPLE_BYTES, METRIC_REGION, METRIC_SAMPLE_BYTES,
                                  N_BINS, QC_SAMPLE_BYTES, SEED)
from nnunet_mbls.errors import InputError

#: format of the statistics files; a file of another version is refused with the command that rewrites it
STATISTICS_VERSION = 1
#: the regions of the per-case scores, when the segmentation is given: name -> (what, whether the metric sums are
#: kept, whether the entropy sum is kept)
QC_REGIONS = {
    "predicted_fg": ("voxels the segmentation labels foreground (mean entropy)", False, True),
    "predicted_boundary": ("band of boundary_width voxels around the segmentation's label boundaries (mean entropy)",
                           False, True),
    "reference_boundary": ("band around the reference's label boundaries, ignore label excluded (ECE)", True, False),
}


class StatisticsError(InputError):
    """A statistics file cannot be used (unreadable, another format version, other settings)."""


@dataclass(frozen=True)
class StatisticsSettings:
    """What the statistics of every case of a fold are computed with (picklable: sent to nnU-Net's export workers).

    ``num_classes``/``ignore_label``: the dataset's labels; ``region``: the voxels of the reported metrics;
    ``fit_region``: the voxels T is fitted on; ``seed``: the fit subsample's keys (per case, see
    :func:`~nnunet_mbls.calibration.subsample.case_seed`) and the samples' draws.
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
    qc_sample_bytes: int = QC_SAMPLE_BYTES

    @property
    def fit_capacity(self) -> int:
        """Fit-sample voxels kept per case: C float32 log-probabilities, a float64 key and an int16 label each."""
        return max(1, self.fit_sample_bytes // (4 * self.num_classes + 10))

    def sample_capacity(self, sample_bytes: int) -> int:
        """Voxels of a stratified sample of ``sample_bytes``: C float32 log-probabilities, an int16 label and an
        int16 stratum each."""
        return max(1, sample_bytes // (4 * self.num_classes + 4))

    @property
    def num_strata(self) -> int:
        """Strata of the stratified samples (see :func:`~nnunet_mbls.calibration.region_voxels.stratum_of`)."""
        return num_strata(self.n_bins)


@dataclass
class RegionSample:
    """One region of a case: its sums as trained (exact) and a stratified sample for the values after T.

    ``states``: a :class:`CalibrationAccumulator`'s states over the region (None where not kept);
    ``entropy_sum``/``n_voxels``: the predictive entropy (nats) summed over the region (None where not kept) and
    the region's voxel count; ``log_probs`` (n, C),
    ``target`` (n,), ``stratum`` (n,): the sample; ``strata_sizes`` (S,): every stratum's voxel count.
    """

    states: list[np.ndarray] | None
    entropy_sum: float | None
    n_voxels: int
    log_probs: np.ndarray
    target: np.ndarray
    stratum: np.ndarray
    strata_sizes: np.ndarray

    ARRAYS = ("log_probs", "target", "stratum", "strata_sizes")


@dataclass
class CaseStatistics:
    """One case's statistics (arrays as numpy; see the module docstring)."""

    case: str
    settings: StatisticsSettings
    #: the metric region (``settings.region``)
    metric: RegionSample
    #: the fit-region voxels with the ``fit_capacity`` smallest keys: keys (n,), log-probabilities (n, C), labels (n,)
    fit_keys: np.ndarray
    fit_log_probs: np.ndarray
    fit_target: np.ndarray
    #: fit-region voxels of the case, and the largest key kept (1.0: every voxel kept)
    fit_seen: int
    fit_threshold: float
    #: the regions of :data:`QC_REGIONS` (empty when computed without the segmentation)
    qc: dict[str, RegionSample] = field(default_factory=dict)
    #: identifies the weights that predicted the case (see :func:`nnunet_mbls.calibration.evaluation.export.weights_id`)
    model_id: str = ""

    def accumulator(self, region: RegionSample | None = None) -> CalibrationAccumulator:
        """A region's accumulator as trained (default: the metric region)."""
        region = region or self.metric
        accumulator = CalibrationAccumulator(self.settings.num_classes, self.settings.n_bins)
        accumulator.load_state_tensors([torch.from_numpy(np.asarray(s)) for s in region.states])
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

        arrays = {"fit_keys": self.fit_keys, "fit_log_probs": self.fit_log_probs, "fit_target": self.fit_target}
        regions = {"metric": self.metric, **{f"qc.{name}": r for name, r in self.qc.items()}}
        sums = {}
        for name, region in regions.items():
            arrays.update({f"{name}.{a}": getattr(region, a) for a in RegionSample.ARRAYS})
            if region.states is not None:  # one array (a file member costs a read each)
                arrays[f"{name}.states"] = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in region.states])
            sums[name] = {"entropy_sum": region.entropy_sum, "n_voxels": region.n_voxels, "states": region.states is not None}
        arrays["header"] = np.array(repr({"version": STATISTICS_VERSION, "case": self.case, "settings": asdict(self.settings),
                                          "fit_seen": self.fit_seen, "fit_threshold": self.fit_threshold,
                                          "model_id": self.model_id, "regions": sums}))
        return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "CaseStatistics":
        """Read a file written by :meth:`save`.

        Raises:
            StatisticsError: the file cannot be read or has another format version.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                header = read_header(data, path)
                regions = {}
                settings = StatisticsSettings(**header["settings"])
                shapes = [tuple(t.shape) for t in
                          CalibrationAccumulator(settings.num_classes, settings.n_bins).state_tensors()]
                for name, sums in header["regions"].items():
                    states = _split(data[f"{name}.states"], shapes) if sums["states"] else None
                    regions[name] = RegionSample(states, sums["entropy_sum"], sums["n_voxels"],
                                                 *(data[f"{name}.{a}"] for a in RegionSample.ARRAYS))
                fit = {k: data[k] for k in ("fit_keys", "fit_log_probs", "fit_target")}
        except StatisticsError:
            raise
        except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same message
            raise StatisticsError(f"cannot read the statistics file {path} ({type(e).__name__}: {e}); run the "
                                  f"validation again (nnunet-mbls calibrate)") from e
        qc = {name[len("qc."):]: r for name, r in regions.items() if name.startswith("qc.")}
        return cls(header["case"], settings, regions["metric"], fit_seen=header["fit_seen"],
                   fit_threshold=header["fit_threshold"], qc=qc, model_id=header["model_id"], **fit)


def _split(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The arrays of ``shapes`` laid end to end in ``flat``."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    if flat.size != sum(sizes):
        raise StatisticsError(f"metric sums of {flat.size} values, expected {sum(sizes)}")
    return [part.reshape(shape) for part, shape in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes)]


def read_header(data, path: str | Path) -> dict:
    """The header of an open statistics file (``np.load``'s result).

    Raises:
        StatisticsError: another format version.
    """
    header = ast.literal_eval(str(data["header"]))
    if header.get("version") != STATISTICS_VERSION:
        raise StatisticsError(f"{path} has statistics format {header.get('version')}, this nnunet-mbls reads "
                              f"{STATISTICS_VERSION}; run the validation again (nnunet-mbls calibrate)")
    return header


def pooled_fit_threshold(statistics: Sequence[CaseStatistics]) -> float:
    """The largest key below which every case kept all its voxels: rows with a key <= it, pooled over the cases,
    are a uniform sample of all their fit-region voxels (each case kept its smallest keys)."""
    return min((s.fit_threshold for s in statistics), default=1.0)


def case_statistics(case: str, logits: Tensor | np.ndarray, ref: np.ndarray, properties: Mapping,
                    transpose_forward: Sequence[int], settings: StatisticsSettings,
                    segmentation: np.ndarray | None = None) -> CaseStatistics:
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
        segmentation: (*spatial) the exported segmentation (original frame); given, the :data:`QC_REGIONS` are
            computed too.

    Returns:
        The :class:`CaseStatistics`.

    Raises:
        InputError: the logits, the reference, the segmentation and the properties do not fit together.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sums are then the same in every process, as evaluate's (one thread per case)
    try:
        return _case_statistics(case, torch.as_tensor(logits), ref, properties, transpose_forward, settings,
                                segmentation)
    finally:
        torch.set_num_threads(threads)


def _case_statistics(case: str, logits: Tensor, ref: np.ndarray, properties: Mapping, transpose_forward: Sequence[int],
                     settings: StatisticsSettings, segmentation: np.ndarray | None) -> CaseStatistics:
    order = [int(a) for a in transpose_forward]
    ref_t = ref.transpose(order)
    box = [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]]
    inside = tuple(slice(a, b) for a, b in box)
    if tuple(ref_t.shape) != tuple(int(s) for s in properties["shape_before_cropping"]) or \
            tuple(ref_t[inside].shape) != tuple(logits.shape[1:]) or logits.shape[0] != settings.num_classes or \
            (segmentation is not None and segmentation.shape != ref.shape):
        raise InputError(f"case {case}: logits {tuple(logits.shape)} (crop box {box}) do not fit the reference "
                         f"{tuple(ref.shape)} transposed by {order} and {settings.num_classes} classes"
                         + ("" if segmentation is None else f", or the segmentation {tuple(segmentation.shape)}"))
    box_original = [box[order.index(axis)] for axis in range(len(order))]

    def voxels_of(mask: np.ndarray) -> RegionVoxels:
        return RegionVoxels(logits, ref_t, mask.transpose(order), inside)

    def mask_of(region: str) -> np.ndarray:
        return region_mask(ref, region, settings.ignore_label, box_original, settings.boundary_width)

    masks = {"metric": mask_of(settings.region)}
    if segmentation is not None:
        masks.update(predicted_fg=segmentation != 0,
                     predicted_boundary=band_near_foreground(segmentation, None, settings.boundary_width),
                     reference_boundary=band_near_foreground(ref, settings.ignore_label, settings.boundary_width))
    # one pass over the union of the regions (they overlap): one softmax per voxel
    union = voxels_of(np.logical_or.reduce(list(masks.values())) if len(masks) > 1 else masks["metric"])
    specs = {"metric": (settings.sample_capacity(settings.metric_sample_bytes), True, False)}
    specs.update({name: (settings.sample_capacity(settings.qc_sample_bytes), *QC_REGIONS[name][1:])
                  for name in masks if name != "metric"})
    samples = region_samples(union, {name: union.membership(m.transpose(order)) for name, m in masks.items()}, specs,
                             settings, np.random.default_rng(case_seed(settings.seed + 1, case)))
    metric, qc = samples.pop("metric"), samples
    metric_voxels = union if len(masks) == 1 else None
    fit_voxels = metric_voxels if settings.fit_region == settings.region and metric_voxels is not None else \
        voxels_of(mask_of(settings.fit_region))
    fit_keys, fit_positions = smallest_keys(fit_voxels.n, settings.fit_capacity, case_seed(settings.seed, case))
    by_position = np.argsort(fit_positions)
    fit_logits, fit_target = fit_voxels.gather(fit_positions[by_position])
    return CaseStatistics(
        case, settings, metric, fit_keys=fit_keys[by_position],
        fit_log_probs=torch.log_softmax(fit_logits, 0).T.contiguous().numpy(), fit_target=fit_target.astype(np.int16),
        fit_seen=fit_voxels.n, fit_threshold=float(fit_keys.max()) if fit_voxels.n > settings.fit_capacity else 1.0,
        qc=qc,
    )


def band_near_foreground(labels: np.ndarray, ignore_label: int | None, width: int) -> np.ndarray:
    """:func:`~nnunet_mbls.calibration.regions.region_mask`'s ``boundary`` band, computed only inside the bounding
    box of the non-zero labels grown by ``width + 1`` (a band voxel lies within ``width`` of a non-zero label, and
    beyond the box every label is 0 like the box's edge, so the result is the same as on the whole image)."""
    mask = np.zeros(labels.shape, dtype=bool)
    nonzero = np.nonzero(labels)
    if not nonzero[0].size:
        return mask
    box = tuple(slice(max(int(a.min()) - width - 1, 0), int(a.max()) + width + 2) for a in nonzero)
    mask[box] = region_mask(labels[box], "boundary", ignore_label, boundary_width=width)
    return mask


def region_samples(voxels: RegionVoxels, members: dict[str, np.ndarray], specs: dict[str, tuple[int, bool, bool]],
                   settings: StatisticsSettings, rng: np.random.Generator) -> dict[str, RegionSample]:
    """The :class:`RegionSample` of every region, in one pass over the voxels of their union.

    Args:
        voxels: the union of the regions.
        members: region -> (n,) bool, which voxels of the union belong to it (:meth:`RegionVoxels.membership`).
        specs: region -> (sample capacity, keep the accumulator states, keep the entropy sum).
        settings: the bins.
        rng: draws the stratified samples, region after region in ``members``' order.
    """
    accumulators = {name: CalibrationAccumulator(settings.num_classes, settings.n_bins) if states else None
                    for name, (_, states, _) in specs.items()}
    entropy = {name: 0.0 if keep else None for name, (_, _, keep) in specs.items()}
    strata = np.empty(voxels.n, dtype=np.int16)
    start = 0
    for logits, target in voxels.chunks():
        part = slice(start, start + target.numel())
        probs = torch.softmax(logits, dim=0)
        strata[part] = stratum_of(probs, target, settings.n_bins).numpy()
        voxel_entropy = None
        for name, member in members.items():
            inside = member[part]
            everything = bool(inside.all())
            if not everything and not inside.any():
                continue
            index = None if everything else torch.from_numpy(inside)
            if accumulators[name] is not None:
                accumulators[name].update(probs if everything else probs[:, index], target if everything else target[index])
            if entropy[name] is not None:
                if voxel_entropy is None:
                    voxel_entropy = -torch.special.xlogy(probs, probs).sum(dim=0, dtype=torch.float64)
                entropy[name] += float(voxel_entropy.sum() if everything else voxel_entropy[index].sum())
        start = part.stop
    samples = {}
    for name, member in members.items():
        where = np.flatnonzero(member)
        region_strata = strata[where]
        positions = where[stratified_positions(region_strata, settings.n_bins, specs[name][0], rng)]
        sample_logits, sample_target = voxels.gather(positions)
        accumulator = accumulators[name]
        samples[name] = RegionSample(
            [s.numpy() for s in accumulator.state_tensors()] if accumulator is not None else None, entropy[name],
            int(where.size), torch.log_softmax(sample_logits, 0).T.contiguous().numpy(),
            sample_target.astype(np.int16), strata[positions],
            np.bincount(region_strata, minlength=settings.num_strata).astype(np.int64),
        )
    return samples
