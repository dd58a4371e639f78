"""Streaming calibration metrics for segmentation: ECE, classwise ECE, MCE, adaptive ECE, NLL, Brier.

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
and puts p = 1 in an extra bucket; both agree whenever no probability lies exactly on an inner edge
(and, for the maximum calibration error, no confidence equals 1).

Adaptive (equal-mass) ECE comes from a fine histogram of the top-label confidence, see
:meth:`CalibrationAccumulator.compute` for the approximation and its bound.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration._inputs import check_positive_int, flatten_case, iter_chunks
from nnunet_mbls.calibration.aggregate import METRIC_KEYS, aggregate  # noqa: F401  (importable from here as before)
from nnunet_mbls.calibration.bins import _float_bin_index, bin_index  # noqa: F401  (importable from here as before)
from nnunet_mbls.calibration.bins import SPARSE_CLASSWISE_FROM, classwise_bins  # noqa: F401
NLL_FLOOR = 1e-12  #: p_target is clamped to at least this before the log

#: Equal-width fine confidence bins behind ``ece_adaptive`` (rounded up to a multiple of n_bins, so that
#: they refine the ``n_bins`` bins and those are sums of fine bins).
ADAPTIVE_FINE_BINS = 4096
#: Log-spaced fine bins per octave of 1 - confidence, used from the power of two where they become narrower
#: than the equal-width ones (1 - confidence < 2**-7 for n_bins = 15), where segmentation confidences crowd ...
ADAPTIVE_TAIL_PER_OCTAVE = 32
#: ... down to 1 - confidence = 2**-24 (float32's resolution just below 1); smaller gaps share the last bin with p = 1.
ADAPTIVE_TAIL_END = 24


#: Elements (classes x voxels) per update chunk: the (C, n) temporaries (up to 8 MiB) are reused by the
#: allocator; much larger chunks are slower (fresh pages), much smaller ones pay per-call overhead.
METRIC_CHUNK_ELEMENTS = 2**20


class CalibrationAccumulator:
    """Sum-reduced calibration statistics of softmax probabilities against integer labels.

    Args:
        num_classes: number of classes C (channels of ``probs``), >= 1.
        n_bins: number of equal-width confidence bins, >= 1 (the paper uses 15).

    States (float64, on the device of the last ``update`` input):
        top-label ECE and MCE: per-bin count, sum of confidence (max prob), sum of accuracy (argmax == target),
        (n_bins,);
        classwise ECE: per class and bin count, sum of p_k, sum of (target == k), (C, n_bins);
        NLL sum, Brier sum and voxel count, scalars;
        adaptive ECE: the same three top-label sums over ``n_fine`` fine confidence bins, (n_fine,), in order
        of increasing confidence: equal-width bins of width 1 / (n_bins * fine_per_bin) (fine_per_bin =
        ceil(4096 / n_bins); the same (lower, upper] convention, refining the ``n_bins`` bins, which are
        computed as their sums) up to confidence 1 - 2**-tail_start, then ``n_tail`` log-spaced bins,
        32 per octave of 1 - p (each 2.2 % of 1 - p wide) down to 1 - p = 2**-24, then one bin for the
        rest (p = 1 included). tail_start is where these get narrower than the equal-width bins (7 for
        n_bins = 15), and at least log2(n_bins) + 1. For n_bins = 15: n_fine = 4078 + 545 (108 KiB of states).
    """

    #: Names of the states, in the order of :meth:`state_tensors` (new states are appended).
    STATE_NAMES = (
        "top_count", "top_conf", "top_acc", "cls_count", "cls_prob", "cls_freq", "nll_sum", "brier_sum", "n_voxels",
        "fine_count", "fine_conf", "fine_acc",
    )

    def __init__(self, num_classes: int, n_bins: int = 15) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes, 3)
        self.n_bins = check_positive_int("n_bins", n_bins, 15)
        self.chunk_voxels = max(1, METRIC_CHUNK_ELEMENTS // self.num_classes)
        self.fine_per_bin = -(-ADAPTIVE_FINE_BINS // self.n_bins)
        # the tail starts where its bins get narrower than the equal-width ones, and within the last n_bins bin
        octave_fraction = 2.0 ** (1 / ADAPTIVE_TAIL_PER_OCTAVE) - 1
        self.tail_start = max(math.ceil(math.log2(self.n_bins * self.fine_per_bin * octave_fraction)),
                              math.ceil(math.log2(self.n_bins)) + 1)
        self.n_tail = max(ADAPTIVE_TAIL_END - self.tail_start, 0) * ADAPTIVE_TAIL_PER_OCTAVE + 1
        # equal-width fine bins in use: 0 .. the one of confidence 1 - 2**-tail_start (exact in binary floats)
        top = (1 - 2.0**-self.tail_start) * self.n_bins
        coarse = min(max(math.ceil(top) - 1, 0), self.n_bins - 1)
        self.n_equal_width = coarse * self.fine_per_bin + math.ceil((top - coarse) * self.fine_per_bin)
        self.n_fine = self.n_equal_width + self.n_tail
        self._states = self._zeros(torch.device("cpu"))

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        shapes = {"top_count": (self.n_bins,), "top_conf": (self.n_bins,), "top_acc": (self.n_bins,),
                  "cls_count": (self.num_classes, self.n_bins), "cls_prob": (self.num_classes, self.n_bins),
                  "cls_freq": (self.num_classes, self.n_bins), "nll_sum": (), "brier_sum": (), "n_voxels": (),
                  "fine_count": (self.n_fine,), "fine_conf": (self.n_fine,), "fine_acc": (self.n_fine,)}
        return {k: torch.zeros(shapes[k], dtype=torch.float64, device=device) for k in self.STATE_NAMES}

    @property
    def device(self) -> torch.device:
        """The device of the states (that of the last ``update`` input; CPU before the first)."""
        return self._states["n_voxels"].device

    def update(self, probs: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add one case (or batch element).

        Args:
            probs: (C, *spatial) probabilities, any float dtype (binned in float32, float64 if given float64).
            target: (*spatial) integer labels in [0, C) wherever ``mask`` is True.
            mask: (*spatial) bool, voxels to include; None includes all.

        The input is validated chunk by chunk; on a ValueError the states are left unchanged.

        Raises:
            ValueError: ``probs`` does not have ``num_classes`` channels; the shapes or dtypes do not fit
                (see :func:`~nnunet_mbls.calibration._inputs.flatten_case`); a probability is non-finite or
                outside [0, 1], or a label outside [0, C), among the included voxels.
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
        # the n_bins top-label bins are sums of fine bins; the tail bins all lie in the last one
        for coarse, fine in (("top_count", "fine_count"), ("top_conf", "fine_conf"), ("top_acc", "fine_acc")):
            below = (self.n_bins - 1) * self.fine_per_bin
            delta[coarse][:-1] = delta[fine][:below].view(self.n_bins - 1, self.fine_per_bin).sum(dim=1)
            delta[coarse][-1] = delta[fine][below:].sum()
        if self.device != p_flat.device:
            self._states = {k: v.to(p_flat.device) for k, v in self._states.items()}
        for k in self.STATE_NAMES:
            self._states[k] += delta[k]

    def _add_chunk(self, s: dict[str, Tensor], p: Tensor, t: Tensor) -> None:
        """Accumulate p (C, n) float, t (n,) int64 into the state dict ``s`` (top-label states: fine ones only).

        Each histogram is one ``bincount`` over an index that also carries a hit bit (2 * bin + hit),
        so counts and hits come out of the same pass: fine top-label bins with hit = (prediction == target),
        class bins (offset by 2 * n_bins per class) with hit = (target == class).
        """
        nb = self.n_bins
        f64 = torch.float64
        conf = p.amax(dim=0)
        p_target = p.gather(0, t[None])  # (1, n)
        hit = p_target[0] == conf  # the target class has the top probability ...
        if int(torch.count_nonzero(p == conf)) != conf.numel():  # ... ties: the prediction is the first maximum
            hit = p.max(dim=0).indices == t
        nf = self.n_fine
        top = self._fine_index(conf).mul_(2).add_(hit).long()
        top_counts = torch.bincount(top, minlength=2 * nf).view(nf, 2).to(f64)
        s["fine_count"] += top_counts.sum(dim=1)
        s["fine_acc"] += top_counts[:, 1]
        s["fine_conf"] += torch.bincount(top, weights=conf.to(f64), minlength=2 * nf).view(nf, 2).sum(dim=1)
        count, freq, prob = classwise_bins(p, t, nb)
        s["cls_count"] += count
        s["cls_freq"] += freq
        s["cls_prob"] += prob
        s["nll_sum"] -= torch.log(p_target.clamp(min=NLL_FLOOR)).sum(dtype=f64)
        # sum_k (p_k - onehot_k)^2 = sum_k p_k^2 - 2 p_target + 1 per voxel
        s["brier_sum"] += (p * p).sum(dtype=f64) - 2 * p_target.sum(dtype=f64) + t.numel()
        s["n_voxels"] += t.numel()

    def _fine_index(self, conf: Tensor) -> Tensor:
        """Fine bin of each confidence (n,) as a new float tensor of conf's dtype (see the class docstring).

        = equal-width index of min(conf, 1 - 2**-a) + log-spaced index of 1 - conf (0 unless 1 - conf < 2**-a),
        without a select (``torch.where`` is several times slower than arithmetic on the CPU). The equal-width
        index is (n_bins bin) * fine_per_bin + sub-bin, the n_bins bin computed exactly as :func:`bin_index`
        does, so that the fine bins sum to the n_bins bins whatever the rounding.
        """
        k, s, a = self.fine_per_bin, ADAPTIVE_TAIL_PER_OCTAVE, self.tail_start
        x = conf.clamp(max=1 - 2.0**-a).mul_(self.n_bins)
        coarse = x.ceil().sub_(1).clamp_(0, self.n_bins - 1)
        fine = x.sub_(coarse).mul_(k).ceil_().sub_(1).clamp_(0, k - 1).add_(coarse, alpha=k)  # x - coarse is exact
        # tail bin j >= 1 holds 1 - conf in [2**-(a + j / s), 2**-(a + (j - 1) / s)); 1 - conf = 0 -> +inf -> last
        gap = torch.rsub(conf, 1).clamp_(min=0)  # exact in float for conf >= 0.5; p slightly above 1 counts as 1
        tail = gap.log2_().mul_(-s).sub_(a * s).ceil_().clamp_(0, self.n_tail)
        return fine.add_(tail)

    def _fine_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Nominal (lower, upper) confidence of each fine bin, (n_fine,) float64 each."""
        j = np.arange(self.n_tail + 1, dtype=np.float64)
        t = 1 - 2.0 ** -(self.tail_start + j / ADAPTIVE_TAIL_PER_OCTAVE)
        t[-1] = 1.0  # the last bin: 1 - conf < 2**-24, p = 1 included
        u = np.minimum(np.arange(self.n_equal_width + 1) / (self.n_bins * self.fine_per_bin), t[0])
        return np.concatenate([u[:-1], t[:-1]]), np.concatenate([u[1:], t[1:]])

    def _equal_mass_groups(self, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Equal-mass bin of each fine bin, (n_fine,) int, and the exact bin edges in voxel ranks, (n_bins - 1,).

        Exact equal-mass bins are those of ``np.array_split(sorted confidences, n_bins)``: voxels of rank
        [edges[b - 1], edges[b]), the first N mod n_bins bins one voxel larger. A fine bin goes whole to
        the bin that holds its middle voxel.
        """
        nb = self.n_bins
        q, r = divmod(int(round(float(count.sum()))), nb)
        b = np.arange(1, nb)
        edges = (b * q + np.minimum(b, r)).astype(np.float64)
        return np.searchsorted(edges, np.cumsum(count) - count / 2, side="right"), edges

    def compute(self) -> dict[str, float | int]:
        """The metrics of everything added so far (the states are not changed).

        ECE = sum_b (n_b / N) |acc_b - conf_b| over top-label bins. CECE = mean over all C classes k of
        sum_b (n_kb / N) |freq_kb - conf_kb| (classwise ECE of Kull et al.; the authors' code averages
        over the classes 0..max label present instead, which differs when a class is absent).
        NLL = mean of -log(max(p_target, 1e-12)); Brier = mean over voxels of sum_k (p_k - onehot_k)^2.
        MCE = max over the top-label bins with n_b > 0 of |acc_b - conf_b| (torchmetrics' norm="max").

        ``ece_adaptive`` = sum_b (n_b / N) |acc_b - conf_b| over ``n_bins`` equal-mass top-label bins: exactly,
        sort the confidences and split them with ``np.array_split`` (N // n_bins or one more voxels per bin).
        Here each fine histogram bin (see the class docstring) goes whole to the equal-mass bin that holds
        its middle voxel, so only voxels of a fine bin that contains a bin boundary can land in another bin
        than in the exact split (with ties, the exact value itself depends on their order). Moving a set M
        of voxels between two bins changes N * ECE by at most 2 |sum_M (hit - conf)|, hence

            |ece_adaptive - exact| <= (2 / N) * sum over fine bins containing a boundary of sum_i |hit_i - conf_i|
                                   <= 2 * (voxels in fine bins that contain a boundary) / N,

        and the value is exact when no fine bin straddles a boundary. ``adaptive_reliability()["max_error"]``
        evaluates a sharper form of this bound on the states. The actual error is far below the bound
        where the gaps acc - conf of neighbouring bins have the same sign (moved voxels then change
        nothing). Measured against the exact split: |difference| <= 1e-17 on 2e6 voxels of softmax-like
        or label-smoothing-like data; with confidences near 1 (a third within 2**-13 of 1) <= 1.1e-6 on
        2e6 voxels, <= 1e-5 on 2e5 (10 draws), <= 1e-4 on 2e4 (30 draws); <= 4.4e-6 (1e-4 of the value)
        on the foreground of eight 2-D nnU-Net validation cases of about 2000 voxels each.

        Returns:
            ``ece``, ``cece``, ``nll``, ``brier``, ``mce``, ``ece_adaptive`` (floats, NaN when no voxel was
            added) and ``n_voxels`` (int).
        """
        s = {k: v.detach().cpu() for k, v in self._states.items()}
        n = float(s["n_voxels"])
        if n == 0:
            return {"ece": math.nan, "cece": math.nan, "nll": math.nan, "brier": math.nan, "mce": math.nan,
                    "ece_adaptive": math.nan, "n_voxels": 0}
        # n_b/N * |acc_b - conf_b| = |sum_acc_b - sum_conf_b| / N, so empty bins need no special case
        ece = float((s["top_acc"] - s["top_conf"]).abs().sum()) / n
        cece = float((s["cls_freq"] - s["cls_prob"]).abs().sum(dim=1).mean()) / n
        filled = s["top_count"] > 0
        mce = float(((s["top_acc"] - s["top_conf"])[filled] / s["top_count"][filled]).abs().max())
        count = s["fine_count"].numpy()
        groups, _ = self._equal_mass_groups(count)
        gaps = np.bincount(groups, weights=(s["fine_acc"] - s["fine_conf"]).numpy(), minlength=self.n_bins)
        return {"ece": ece, "cece": cece, "nll": float(s["nll_sum"]) / n, "brier": float(s["brier_sum"]) / n,
                "mce": mce, "ece_adaptive": float(np.abs(gaps).sum()) / n, "n_voxels": int(round(n))}

    def adaptive_reliability(self) -> dict[str, np.ndarray | float]:
        """Equal-mass top-label reliability curve and the error bound of ``ece_adaptive``.

        For each fine bin with count c, hits h and confidences in [lo, hi], the m of its voxels that the
        exact split puts into another bin than the chosen one add at most
        2 * max(min(m, h) - m * lo, m * hi - max(0, m - (c - h))) / N to ``max_error``.

        Returns:
            ``bin_lower``, ``bin_upper`` (nominal confidence range of the fine bins in each bin), mean
            ``confidence`` and ``accuracy`` (NaN where empty) and ``count``, each (n_bins,) float64 (usable with
            :func:`plot_reliability`); ``ece`` (= ``compute()["ece_adaptive"]``) and ``max_error``: an upper
            bound on |ece - exact equal-mass ECE| for any order of the voxels inside a fine bin (0 when no
            fine bin straddles a bin boundary; NaN when empty).
        """
        s = {k: v.detach().cpu().numpy() for k, v in self._states.items()}
        count, hits, conf_sum = s["fine_count"], s["fine_acc"], s["fine_conf"]
        nb, n = self.n_bins, float(count.sum())
        groups, edges = self._equal_mass_groups(count)
        g_count = np.bincount(groups, weights=count, minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.bincount(groups, weights=conf_sum, minlength=nb) / g_count
            accuracy = np.bincount(groups, weights=hits, minlength=nb) / g_count
        lo, hi = self._fine_edges()
        filled = count > 0
        lower = np.full(nb, np.nan)
        upper = np.full(nb, np.nan)
        np.fmin.at(lower, groups[filled], lo[filled])
        np.fmax.at(upper, groups[filled], hi[filled])
        if n == 0:
            return {"bin_lower": lower, "bin_upper": upper, "confidence": confidence, "accuracy": accuracy,
                    "count": g_count, "ece": math.nan, "max_error": math.nan}
        ece = float(np.abs(np.bincount(groups, weights=hits - conf_sum, minlength=nb)).sum()) / n
        # rank range [start, stop) of each fine bin; m = its voxels in exact bins other than its own
        stop = np.cumsum(count)
        start = stop - count
        bounds = np.concatenate([[0.0], edges, [n]])
        lo, hi = lo - 1e-6, hi + 1e-6  # margin for the float rounding of the bin index
        hi[-1] = 1 + 1e-3  # update accepts probabilities up to 1 + 1e-3
        bound = 0.0
        for b in range(nb):
            m = np.clip(np.minimum(stop, bounds[b + 1]) - np.maximum(start, bounds[b]), 0, None)
            m[groups == b] = 0
            worst = np.maximum(np.minimum(m, hits) - m * lo, m * hi - np.maximum(0, m - (count - hits)))
            bound += 2 * float(worst[m > 0].sum())
        return {"bin_lower": lower, "bin_upper": upper, "confidence": confidence, "accuracy": accuracy,
                "count": g_count, "ece": ece, "max_error": bound / n}

    def reliability(self) -> dict[str, np.ndarray]:
        """Top-label reliability curve of the ``n_bins`` equal-width bins.

        Returns:
            ``bin_lower``, ``bin_upper``, mean ``confidence`` and ``accuracy`` per bin (NaN where the bin is
            empty) and ``count``, each of shape (n_bins,) (usable with :func:`plot_reliability`).
        """
        count = self._states["top_count"].detach().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(count > 0, self._states["top_conf"].detach().cpu().numpy() / count, np.nan)
            acc = np.where(count > 0, self._states["top_acc"].detach().cpu().numpy() / count, np.nan)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": conf, "accuracy": acc, "count": count}

    def merge(self, other: "CalibrationAccumulator") -> "CalibrationAccumulator":
        """Add the states of ``other`` into this one (pooling their voxels); ``a += b`` does the same.

        Args:
            other: an accumulator with the same ``num_classes`` and ``n_bins``; its states are moved to this
                one's device for the sum and are not changed.

        Returns:
            ``self``.

        Raises:
            ValueError: ``other`` is not a :class:`CalibrationAccumulator`, or its ``num_classes``/``n_bins``
                differ.
        """
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

        Returns:
            12 float64 tensors (shapes in the class docstring), on :attr:`device`.
        """
        return [self._states[k] for k in self.STATE_NAMES]

    def load_state_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Replace the states with copies of ``tensors`` (as returned by :meth:`state_tensors`).

        Args:
            tensors: one tensor per name of :attr:`STATE_NAMES`, in that order, of the shapes this accumulator's
                ``num_classes`` and ``n_bins`` give; copied as float64 onto the device of ``tensors[0]``.

        Raises:
            ValueError: the number of tensors differs from ``len(STATE_NAMES)``, or a tensor has the wrong shape
                (saved with other ``num_classes``/``n_bins``); the states are then unchanged.
        """
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
