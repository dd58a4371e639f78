"""Streaming calibration metrics for segmentation: ECE, classwise ECE, NLL, Brier.

:class:`CalibrationAccumulator` follows torchmetrics' ``Metric`` design: ``update`` adds sums to
fixed-size float64 states (memory does not grow with the number of voxels), ``compute`` turns them
into metrics, and the states are plain sums, so accumulators ``merge`` by addition and a DDP caller
can ``all_reduce(SUM)`` the tensors of :meth:`state_tensors`.

Two ways of aggregating many volumes:

* **per case then mean over cases** ("paper" mode, as the MbLS authors report): one accumulator per
  volume (``reset`` or a new one per case), ``compute`` each, then :func:`aggregate` the dicts.
* **pooled**: one accumulator updated with every volume (or per-case accumulators ``merge``-d);
  every voxel weighs the same, so large volumes dominate.

Binning: ``n_bins`` equal-width bins over [0, 1]; bin index = clamp(ceil(p * n_bins) - 1, 0, n_bins - 1),
so bins are (lower, upper] as in the authors' code, and p = 0 falls into bin 0 instead of being
dropped. torchmetrics' ``MulticlassCalibrationError`` bins [lower, upper) instead (``bucketize(right=True)``)
and puts p = 1 in an extra bucket; both agree whenever no probability lies exactly on an inner edge.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration._inputs import check_positive_int, flatten_case, iter_chunks

METRIC_KEYS = ("ece", "cece", "nll", "brier")
NLL_FLOOR = 1e-12  #: p_target is clamped to at least this before the log


def bin_index(p: Tensor, n_bins: int) -> Tensor:
    """Bin of each probability: clamp(ceil(p * n_bins) - 1, 0, n_bins - 1) as int64, same shape as ``p``."""
    return _float_bin_index(p, n_bins).long()


def _float_bin_index(p: Tensor, n_bins: int) -> Tensor:
    """:func:`bin_index` as a new float tensor of p's dtype (small integers are exact; float ops are faster)."""
    return (p * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1)


#: Elements (classes x voxels) per update chunk: the (C, n) temporaries (up to 8 MiB) are reused by the
#: allocator; much larger chunks are slower (fresh pages), much smaller ones pay per-call overhead.
METRIC_CHUNK_ELEMENTS = 2**20


class CalibrationAccumulator:
    """Sum-reduced calibration statistics of softmax probabilities against integer labels.

    Args:
        num_classes: number of classes C (channels of ``probs``), >= 1.
        n_bins: number of equal-width confidence bins, >= 1 (the paper uses 15).

    States (float64, on the device of the last ``update`` input):
        top-label ECE: per-bin count, sum of confidence (max prob), sum of accuracy (argmax == target), (n_bins,);
        classwise ECE: per class and bin count, sum of p_k, sum of (target == k), (C, n_bins);
        NLL sum, Brier sum and voxel count, scalars.
    """

    #: Names of the states, in the order of :meth:`state_tensors`.
    STATE_NAMES = (
        "top_count", "top_conf", "top_acc", "cls_count", "cls_prob", "cls_freq", "nll_sum", "brier_sum", "n_voxels"
    )

    def __init__(self, num_classes: int, n_bins: int = 15) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes, 3)
        self.n_bins = check_positive_int("n_bins", n_bins, 15)
        self.chunk_voxels = max(1, METRIC_CHUNK_ELEMENTS // self.num_classes)
        self._states = self._zeros(torch.device("cpu"))

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        shapes = {"top_count": (self.n_bins,), "top_conf": (self.n_bins,), "top_acc": (self.n_bins,),
                  "cls_count": (self.num_classes, self.n_bins), "cls_prob": (self.num_classes, self.n_bins),
                  "cls_freq": (self.num_classes, self.n_bins), "nll_sum": (), "brier_sum": (), "n_voxels": ()}
        return {k: torch.zeros(shapes[k], dtype=torch.float64, device=device) for k in self.STATE_NAMES}

    @property
    def device(self) -> torch.device:
        return self._states["n_voxels"].device

    def update(self, probs: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add one case (or batch element).

        Args:
            probs: (C, *spatial) probabilities, any float dtype (binned in float32, float64 if given float64).
            target: (*spatial) integer labels in [0, C) wherever ``mask`` is True.
            mask: (*spatial) bool, voxels to include; None includes all.

        The input is validated chunk by chunk; on a ValueError the states are left unchanged.
        """
        p_flat, t_flat, m_flat = flatten_case(probs, target, mask)
        if p_flat.shape[0] != self.num_classes:
            raise ValueError(
                f"probs has {p_flat.shape[0]} channels (shape {tuple(probs.shape)}) but "
                f"num_classes={self.num_classes}; pass probabilities with one channel per class"
            )
        delta = self._zeros(p_flat.device)
        dtype = torch.float64 if p_flat.dtype == torch.float64 else torch.float32
        for p, t in iter_chunks(p_flat, t_flat, m_flat, self.chunk_voxels):
            self._add_chunk(delta, p.to(dtype), t)
        if self.device != p_flat.device:
            self._states = {k: v.to(p_flat.device) for k, v in self._states.items()}
        for k in self.STATE_NAMES:
            self._states[k] += delta[k]

    def _add_chunk(self, s: dict[str, Tensor], p: Tensor, t: Tensor) -> None:
        """Accumulate p (C, n) float, t (n,) int64 into the state dict ``s``.

        Each histogram is one ``bincount`` over an index that also carries a hit bit (2 * bin + hit),
        so counts and hits come out of the same pass: top-label bins with hit = (prediction == target),
        class bins (offset by 2 * n_bins per class) with hit = (target == class).
        """
        c, nb = self.num_classes, self.n_bins
        f64 = torch.float64
        conf = p.amax(dim=0)
        p_target = p.gather(0, t[None])  # (1, n)
        hit = p_target[0] == conf  # the target class has the top probability ...
        if int(torch.count_nonzero(p == conf)) != conf.numel():  # ... ties: the prediction is the first maximum
            hit = p.max(dim=0).indices == t
        top = _float_bin_index(conf, nb).mul_(2).add_(hit).long()
        top_counts = torch.bincount(top, minlength=2 * nb).view(nb, 2).to(f64)
        s["top_count"] += top_counts.sum(dim=1)
        s["top_acc"] += top_counts[:, 1]
        s["top_conf"] += torch.bincount(top, weights=conf.to(f64), minlength=2 * nb).view(nb, 2).sum(dim=1)
        classes = torch.arange(c, device=p.device, dtype=p.dtype)[:, None]
        cls = _float_bin_index(p, nb).mul_(2).add_(t[None] == classes).add_(classes * 2 * nb).long().reshape(-1)
        cls_counts = torch.bincount(cls, minlength=2 * c * nb).view(c, nb, 2).to(f64)
        s["cls_count"] += cls_counts.sum(dim=2)
        s["cls_freq"] += cls_counts[:, :, 1]
        s["cls_prob"] += torch.bincount(cls, weights=p.reshape(-1).to(f64), minlength=2 * c * nb).view(c, nb, 2).sum(2)
        s["nll_sum"] -= torch.log(p_target.clamp(min=NLL_FLOOR)).sum(dtype=f64)
        # sum_k (p_k - onehot_k)^2 = sum_k p_k^2 - 2 p_target + 1 per voxel
        s["brier_sum"] += (p * p).sum(dtype=f64) - 2 * p_target.sum(dtype=f64) + t.numel()
        s["n_voxels"] += t.numel()

    def compute(self) -> dict[str, float | int]:
        """Return ``ece``, ``cece``, ``nll``, ``brier`` (floats, NaN when no voxel) and ``n_voxels`` (int).

        ECE = sum_b (n_b / N) |acc_b - conf_b| over top-label bins. CECE = mean over all C classes k of
        sum_b (n_kb / N) |freq_kb - conf_kb| (classwise ECE of Kull et al.; the authors' code averages
        over the classes 0..max label present instead, which differs when a class is absent).
        NLL = mean of -log(max(p_target, 1e-12)); Brier = mean over voxels of sum_k (p_k - onehot_k)^2.
        """
        s = {k: v.detach().cpu() for k, v in self._states.items()}
        n = float(s["n_voxels"])
        if n == 0:
            return {"ece": math.nan, "cece": math.nan, "nll": math.nan, "brier": math.nan, "n_voxels": 0}
        # n_b/N * |acc_b - conf_b| = |sum_acc_b - sum_conf_b| / N, so empty bins need no special case
        ece = float((s["top_acc"] - s["top_conf"]).abs().sum()) / n
        cece = float((s["cls_freq"] - s["cls_prob"]).abs().sum(dim=1).mean()) / n
        return {"ece": ece, "cece": cece, "nll": float(s["nll_sum"]) / n,
                "brier": float(s["brier_sum"]) / n, "n_voxels": int(round(n))}

    def reliability(self) -> dict[str, np.ndarray]:
        """Top-label reliability curve: ``bin_lower``, ``bin_upper``, mean ``confidence`` and ``accuracy``
        per bin (NaN where the bin is empty) and ``count``, each of shape (n_bins,)."""
        count = self._states["top_count"].detach().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(count > 0, self._states["top_conf"].detach().cpu().numpy() / count, np.nan)
            acc = np.where(count > 0, self._states["top_acc"].detach().cpu().numpy() / count, np.nan)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": conf, "accuracy": acc, "count": count}

    def merge(self, other: "CalibrationAccumulator") -> "CalibrationAccumulator":
        """Add the states of ``other`` (same num_classes and n_bins) into this one; returns self."""
        if not isinstance(other, CalibrationAccumulator):
            raise ValueError(f"other must be a CalibrationAccumulator, got {type(other).__name__}")
        if (other.num_classes, other.n_bins) != (self.num_classes, self.n_bins):
            raise ValueError(
                f"cannot merge an accumulator with num_classes={other.num_classes}, n_bins={other.n_bins} into one "
                f"with num_classes={self.num_classes}, n_bins={self.n_bins}; build both with the same arguments"
            )
        for k in self.STATE_NAMES:
            self._states[k] += other._states[k].to(self.device)
        return self

    def __iadd__(self, other: "CalibrationAccumulator") -> "CalibrationAccumulator":
        return self.merge(other)

    def reset(self) -> None:
        """Zero every state (keeping the device)."""
        self._states = self._zeros(self.device)

    def state_tensors(self) -> list[Tensor]:
        """The state tensors themselves (not copies), in :attr:`STATE_NAMES` order.

        For DDP: ``for t in acc.state_tensors(): dist.all_reduce(t, op=SUM)`` after the last update
        (an update on another device moves the states, so fetch the list right before reducing).
        """
        return [self._states[k] for k in self.STATE_NAMES]

    def load_state_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Replace the states with copies of ``tensors`` (as returned by :meth:`state_tensors`)."""
        if len(tensors) != len(self.STATE_NAMES):
            raise ValueError(
                f"expected {len(self.STATE_NAMES)} tensors ({', '.join(self.STATE_NAMES)}), got {len(tensors)}"
            )
        ref = self._zeros(torch.device("cpu"))
        for k, t in zip(self.STATE_NAMES, tensors):
            if tuple(t.shape) != tuple(ref[k].shape):
                raise ValueError(f"state {k} must have shape {tuple(ref[k].shape)}, got {tuple(t.shape)}; "
                                 "were they saved with other num_classes/n_bins?")
        device = tensors[0].device
        self._states = {
            k: t.detach().to(device=device, dtype=torch.float64).clone() for k, t in zip(self.STATE_NAMES, tensors)
        }


def aggregate(per_case: Sequence[dict], keys: Sequence[str] = METRIC_KEYS) -> dict[str, float | int]:
    """Mean over cases of per-case metric dicts ("per case then mean over cases", the paper's mode).

    For each key: ``key`` = mean over cases ignoring NaN (a case with no voxel in the region),
    ``key_std`` = sample standard deviation (ddof=1; NaN with fewer than 2 values), ``key_n`` = number
    of non-NaN cases. Also ``n_cases`` and ``n_voxels`` (total, when the dicts carry it).
    Contrast with "pooled": one accumulator over all voxels of all cases.
    """
    if len(per_case) == 0:
        raise ValueError("per_case is empty: no case to aggregate; check that the prediction folder has files")
    out: dict[str, float | int] = {}
    for k in keys:
        values = np.array([float(d.get(k, math.nan)) for d in per_case], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[k] = float(finite.mean()) if finite.size else math.nan
        out[f"{k}_std"] = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
        out[f"{k}_n"] = int(finite.size)
    out["n_cases"] = len(per_case)
    out["n_voxels"] = int(sum(int(d.get("n_voxels", 0)) for d in per_case))
    return out
