"""Calibration metrics and temperature fitting: throughput and peak extra memory against voxel count.

Data: one "case" of N voxels, C classes: probabilities (C, N) float32 (nnU-Net's layout) that are
over-confident by a factor 2 in logit space (labels (N,) uint8 are drawn from softmax(z), the
probabilities are softmax(2 z)), generated chunk by chunk into preallocated tensors so that the
generator's temporaries stay small. The input tensors exist before any measurement; "peak extra" is
what a method allocates on top of them (see ``_common.peak_extra_bytes``).

Metrics, each given the whole case at once as its natural API takes it:
  * ``CalibrationAccumulator`` (this package): ``update(probs, target)`` + ``compute()``; computes
    top-label ECE, classwise ECE, NLL and Brier in one streaming pass (fixed-size states);
  * torchmetrics ``MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")`` (top-label ECE
    only; ``update(probs[None], target[None])`` + ``compute()``, default argument validation);
  * a per-bin Python loop in the MbLS authors' style (their ``ECELoss`` / ``ClasswiseECELoss``: for
    each bin, boolean masks over all voxels), ECE and classwise ECE, on probabilities.
The first call of each method (per size) is the warm-up and is profiled for memory; then
``--repeats`` timed calls (fewer, at least one, once ``--budget`` seconds are spent), median reported.

Reading the input: the time ``np.load`` takes to read the same probabilities back from a compressed
``.npz`` as nnU-Net writes them (``np.savez_compressed(..., probabilities=...)``, the input of
``nnunet-mbls evaluate`` and ``calibrate``), to put the metric times in proportion (``--no-npz`` skips it;
writing the file is not timed).

Temperature: ``VoxelSubsampler(max_voxels=10^6)`` over the case then ``fit_temperature`` on the
sample (what ``nnunet-mbls calibrate`` and the trainers do), against ``fit_temperature`` on all N
voxels (log of the probabilities, transposed to (N, C), included in the time).

    python benchmarks/bench_calibration.py [--sizes 1e6 1e7 1e8] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MiB, load_average, machine_info, markdown_table, median, peak_extra_bytes,  # noqa: E402
                     save_json, set_threads, timed_repeats)

from nnunet_mbls.calibration import CalibrationAccumulator, VoxelSubsampler, fit_temperature  # noqa: E402

N_BINS = 15
GEN_CHUNK = 2**20
CPU = torch.device("cpu")
#: rough peak extra bytes per voxel (C = 4), to skip a method that would not fit in the available memory
BYTES_PER_VOXEL = {"accumulator": 0, "torchmetrics": 64, "authors_loop": 32}


def make_case(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (C, N) float32 = softmax(2 z), labels (N,) uint8 drawn from softmax(z); chunk-wise."""
    gen = torch.Generator().manual_seed(seed)
    probs, target = torch.empty(c, n), torch.empty(n, dtype=torch.uint8)
    for s in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - s)
        z = 2 * torch.randn(c, m, generator=gen)
        probs[:, s : s + m] = torch.softmax(2 * z, dim=0)
        cdf = torch.softmax(z, dim=0).cumsum_(dim=0)
        target[s : s + m] = (cdf < torch.rand(m, generator=gen)).sum(dim=0).clamp_max_(c - 1)
    return probs, target


def accumulator(probs: torch.Tensor, target: torch.Tensor) -> dict:
    acc = CalibrationAccumulator(probs.shape[0], N_BINS)
    acc.update(probs, target)
    return acc.compute()


def torchmetrics_ece(probs: torch.Tensor, target: torch.Tensor) -> dict:
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=probs.shape[0], n_bins=N_BINS, norm="l1")
    metric.update(probs.unsqueeze(0), target.unsqueeze(0))
    return {"ece": float(metric.compute())}


def _binned_gap(confidences: torch.Tensor, hits: torch.Tensor) -> float:
    """The authors' inner loop: sum over bins of |mean conf - mean hit| * fraction of voxels in the bin."""
    edges = torch.linspace(0, 1, N_BINS + 1)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = confidences.gt(lower.item()) * confidences.le(upper.item())
        prop_in_bin = in_bin.float().mean()
        if prop_in_bin.item() > 0:
            accuracy_in_bin = hits[in_bin].float().mean()
            avg_confidence_in_bin = confidences[in_bin].mean()
            total += float(torch.abs(avg_confidence_in_bin - accuracy_in_bin) * prop_in_bin)
    return total


def authors_loop(probs: torch.Tensor, target: torch.Tensor) -> dict:
    """ECE and classwise ECE as the MbLS authors compute them (ECELoss, ClasswiseECELoss), on probabilities."""
    confidences, predictions = torch.max(probs, 0)
    ece = _binned_gap(confidences, predictions.eq(target))
    cece = sum(_binned_gap(probs[k], target.eq(k)) for k in range(probs.shape[0])) / probs.shape[0]
    return {"ece": ece, "cece": cece}


METHODS = {"accumulator": accumulator, "torchmetrics": torchmetrics_ece, "authors_loop": authors_loop}


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_metrics(probs, target, args) -> list[dict]:
    n = target.numel()
    rows = []
    for name, fn in METHODS.items():
        need = BYTES_PER_VOXEL[name] * n
        if need > 0.8 * available_bytes():
            rows.append({"voxels": n, "method": name, "skipped": f"needs ~{need / 2**30:.1f} GiB, "
                         f"{available_bytes() / 2**30:.1f} GiB available"})
            continue
        result = {}
        memory = peak_extra_bytes(lambda: result.update(fn(probs, target)), CPU)  # also the warm-up
        times = timed_repeats(lambda: fn(probs, target), CPU, args.repeats, args.budget)
        rows.append({"voxels": n, "method": name, "times_s": times, "median_s": median(times),
                     "voxels_per_s": n / median(times), "peak_extra_bytes": memory,
                     "ece": result.get("ece"), "cece": result.get("cece"), "loadavg": load_average()})
        print(f"  {name:13s} N={n:.0e}: {median(times):8.3f} s, {memory / MiB:9.1f} MiB, ece={result.get('ece'):.5f}",
              flush=True)
    base = {r["method"]: r for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" in r and "torchmetrics" in base:
            r["speedup_vs_torchmetrics"] = base["torchmetrics"]["median_s"] / r["median_s"]
    return rows


def bench_npz_read(probs, args) -> dict:
    """Median time of np.load(...)["probabilities"] of a compressed nnU-Net-style .npz of ``probs``."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = os.path.join(tmp, "case.npz")
        np.savez_compressed(path, probabilities=probs.numpy())
        size = os.path.getsize(path)
        times = timed_repeats(lambda: np.load(path)["probabilities"], CPU, args.repeats, args.budget)
    n = probs.shape[1]
    print(f"  {'read .npz':13s} N={n:.0e}: {median(times):8.3f} s ({size / MiB:.0f} MiB file)", flush=True)
    return {"voxels": n, "method": "read .npz (np.load)", "times_s": times, "median_s": median(times),
            "voxels_per_s": n / median(times), "file_bytes": size, "loadavg": load_average()}


def subsample_then_fit(probs, target, max_voxels: int) -> float:
    sampler = VoxelSubsampler(max_voxels=max_voxels, seed=0)
    sampler.add(probs, target)
    return fit_temperature(*sampler.arrays())


def full_fit(probs, target) -> float:
    return fit_temperature(probs.log().T, target)


def bench_temperature(probs, target, args) -> list[dict]:
    n = target.numel()
    rows = []
    variants = {f"subsample {args.max_voxels:.0e} + fit": lambda: subsample_then_fit(probs, target, args.max_voxels),
                "fit on all voxels": lambda: full_fit(probs, target)}
    for name, fn in variants.items():
        result = {}
        memory = peak_extra_bytes(lambda: result.update(T=fn()), CPU)  # also the warm-up
        times = timed_repeats(fn, CPU, args.fit_repeats, args.budget)
        rows.append({"voxels": n, "method": name, "times_s": times, "median_s": median(times),
                     "peak_extra_bytes": memory, "T": result["T"], "loadavg": load_average()})
        print(f"  {name:22s} N={n:.0e}: {median(times):8.3f} s, {memory / MiB:9.1f} MiB, T={result['T']:.4f}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="voxel counts N")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per metric and size (median)")
    parser.add_argument("--fit-repeats", type=int, default=3, help="timed calls per temperature variant and size")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="stop repeating a method at a size after this many seconds (at least one timed call)")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    parser.add_argument("--max-voxels", type=int, default=1_000_000, help="VoxelSubsampler bound")
    parser.add_argument("--no-npz", dest="npz", action="store_false", help="skip the .npz read reference")
    parser.add_argument("--tmp", help="folder for the temporary .npz (default: the system's temp folder)")
    parser.add_argument("--json", metavar="OUT", help="write the raw numbers to this JSON file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    print(f"machine: {info}", flush=True)
    metric_rows, fit_rows = [], []
    for size in args.sizes:
        probs, target = make_case(int(size), args.classes)
        print(f"N = {int(size):.0e} (C = {args.classes}), load average {load_average()}", flush=True)
        metric_rows += bench_metrics(probs, target, args)
        if args.npz:
            metric_rows.append(bench_npz_read(probs, args))
        fit_rows += bench_temperature(probs, target, args)
        del probs, target
    info["loadavg_end"] = load_average()

    print(f"\n### Calibration metrics, C = {args.classes}, {N_BINS} bins, CPU "
          f"({torch.get_num_threads()} threads), load average {info['loadavg']} -> {info['loadavg_end']}\n")
    print(markdown_table(
        ["voxels", "method", "median (s)", "voxels/s", "speed-up vs torchmetrics", "peak extra (MiB)", "ECE"],
        [[f"{r['voxels']:.0e}", r["method"]] + ([r["median_s"], f"{r['voxels_per_s']:.3g}",
          r.get("speedup_vs_torchmetrics", float("nan")), r.get("peak_extra_bytes", float("nan")) / MiB,
          r.get("ece", float("nan"))]
          if "median_s" in r else ["skipped: " + r["skipped"], "", "", "", ""]) for r in metric_rows]))
    print("\n### Temperature fit\n")
    print(markdown_table(["voxels", "method", "median (s)", "peak extra (MiB)", "T"],
                         [[f"{r['voxels']:.0e}", r["method"], r["median_s"], r["peak_extra_bytes"] / MiB, r["T"]]
                          for r in fit_rows]))
    payload = {"machine": info, "args": vars(args), "metrics": metric_rows, "temperature": fit_rows}
    save_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
