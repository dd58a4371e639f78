"""Calibration statistics of region-based (sigmoid) models, one small file per validation case.

A region-based nnU-Net model outputs one logit z_r per region and predicts P(voxel in r) = σ(z_r); its
calibration is per region: the binary ECE of σ(z_r) against the region's reference, and one temperature T_r per
region, σ(z_r / T_r), which keeps the 0.5-threshold segmentation (the sign of z_r) unchanged.

Scored voxels: those inside nnU-Net's crop box (outside it nnU-Net's exported region probabilities are 0), the
ignore label excluded. Per case and region the file holds the exact sums of the metrics (15 equal-width bins of
σ(z): voxels, Σσ, Σy; the summed binary cross entropy) and the logits and targets of the voxels with the
``capacity`` smallest of uniform keys drawn from a generator seeded by (seed, case): over several cases the
pooled voxels with the smallest keys are a uniform sample of all their voxels, the temperature fit's input.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InputError
from ..io import atomic_write
from .region_voxels import smallest_keys
from .subsample import case_seed

REGION_STATISTICS_VERSION = 1
N_BINS = 15


@dataclass(frozen=True)
class RegionSettings:
    """The regions (label tuples of ``dataset.json``, in output-channel order), the ignore label, seed and sample."""

    regions: tuple[tuple[int, ...], ...]
    ignore_label: int | None
    seed: int
    capacity: int


@dataclass
class RegionCaseStatistics:
    """One case: per region (R rows) the metric sums and the keyed sample (see the module docstring)."""

    case: str
    bins: np.ndarray  # (R, 3, N_BINS) float64: voxels, sum of sigma(z), sum of y per bin
    nll: np.ndarray  # (R,) float64 summed binary cross entropy
    keys: np.ndarray  # (k,) float64, ascending (the same voxels for every region)
    logits: np.ndarray  # (R, k) float32
    targets: np.ndarray  # (R, k) bool
    model_id: str | None = None

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (an uncompressed ``.npz``) atomically."""
        header = repr({"version": REGION_STATISTICS_VERSION, "case": self.case, "model_id": self.model_id})
        return atomic_write(Path(path), lambda tmp: np.savez(tmp, header=np.array(header), bins=self.bins,
                                                             nll=self.nll, keys=self.keys, logits=self.logits,
                                                             targets=self.targets))

    @classmethod
    def load(cls, path: str | Path) -> "RegionCaseStatistics":
        """Read a file written by :meth:`save`.

        Raises:
            InputError: the file is of another format version.
        """
        with np.load(path) as data:
            header = ast.literal_eval(str(data["header"]))
            if header.get("version") != REGION_STATISTICS_VERSION:
                raise InputError(f"{path} holds region statistics of format {header.get('version')}, this nnunet-mbls "
                                 f"reads {REGION_STATISTICS_VERSION}; validate again (nnUNetv2_train ... --val)")
            return cls(header["case"], data["bins"], data["nll"], data["keys"], data["logits"], data["targets"],
                       header.get("model_id"))


def binary_bins(z: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, float]:
    """(3, N_BINS) float64 sums (voxels, Σσ(z), Σy) over 15 equal-width bins of σ(z), and the summed BCE."""
    p = torch.sigmoid(z.double())
    index = (p * N_BINS).long().clamp_(max=N_BINS - 1)
    sums = torch.stack([torch.bincount(index, weights=w, minlength=N_BINS)
                        for w in (torch.ones_like(p), p, y.double())])
    return sums.numpy(), float(F.binary_cross_entropy_with_logits(z.double(), y.double(), reduction="sum"))


def binary_metrics(bins: np.ndarray, nll: float) -> dict:
    """Binary ECE (Σ_b |Σσ − Σy| / n), mean BCE and the voxel count from summed bins; NaN without voxels."""
    n = float(bins[0].sum())
    if n == 0:
        return {"ece": float("nan"), "nll": float("nan"), "n_voxels": 0}
    return {"ece": float(np.abs(bins[1] - bins[2]).sum() / n), "nll": nll / n, "n_voxels": int(n)}


def region_case_statistics(case: str, logits: torch.Tensor | np.ndarray, ref: np.ndarray, properties: Mapping,
                           transpose_forward: Sequence[int], settings: RegionSettings) -> RegionCaseStatistics:
    """The statistics of one case.

    Args:
        case: the case name (seeds its keys).
        logits: (R, *cropped) region logits resampled to the original spacing, in nnU-Net's transposed frame and
            inside its crop box (what nnU-Net's export turns into probabilities).
        ref: (*spatial) integer reference labels in the original axis order.
        properties: the case's nnU-Net properties (``bbox_used_for_cropping``).
        transpose_forward: the plans' ``transpose_forward``.
        settings: the regions, ignore label, seed and sample size.

    Raises:
        InputError: the logits, the reference and the regions do not fit together.
    """
    logits = torch.as_tensor(logits)
    inside = tuple(slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])
    ref_c = ref.transpose([int(a) for a in transpose_forward])[inside]
    if tuple(ref_c.shape) != tuple(logits.shape[1:]) or logits.shape[0] != len(settings.regions):
        raise InputError(f"case {case}: logits {tuple(logits.shape)} do not fit the cropped reference "
                         f"{tuple(ref_c.shape)} and {len(settings.regions)} regions")
    scored = np.ones(ref_c.shape, bool) if settings.ignore_label is None else ref_c != settings.ignore_label
    flat_ref = torch.from_numpy(ref_c[scored].astype(np.int64))
    keys, positions = smallest_keys(int(scored.sum()), settings.capacity, case_seed(settings.seed, case))
    order = np.argsort(positions)
    keys, positions = keys[order], torch.from_numpy(positions[order])
    bins, nll, sample_logits, sample_targets = [], [], [], []
    for r, labels in enumerate(settings.regions):
        z = logits[r][torch.from_numpy(scored)].float()
        y = torch.isin(flat_ref, torch.tensor(labels, dtype=torch.int64))
        b, s = binary_bins(z, y)
        bins.append(b)
        nll.append(s)
        sample_logits.append(z[positions].numpy())
        sample_targets.append(y[positions].numpy())
    by_key = np.argsort(keys)
    return RegionCaseStatistics(case, np.stack(bins), np.array(nll), keys[by_key],
                                np.stack(sample_logits)[:, by_key], np.stack(sample_targets)[:, by_key])
