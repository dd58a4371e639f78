"""How well can the metrics after temperature scaling be estimated from a small per-case voxel sample?

Groundwork for streaming calibration statistics (no probability files): T is fitted only once every validation
case has been exported, so the after-T metrics cannot be summed while a case's probabilities are in memory; a
per-case sample of the metric region's probabilities (kept in a small file) can. This script measures the error
of two such estimators of the foreground ECE after T against the exact value over all voxels:

- ``uniform``: m voxels drawn uniformly without replacement from the region;
- ``stratified``: strata by (predicted class, correct or not, half-octave bin of 1 - confidence at T = 1), an
  equal share of m per stratum, each voxel weighted by its stratum's size / its sample size.

Per case (the paper's ECE is per case, then averaged) and for the cases pooled into one (to reach larger m), over
``--seeds`` draws. Input: trained folds whose ``validation/`` keeps nnU-Net's ``.npz`` (``nnUNetv2_train ...
--val --npz``); T is the fold's own from its calibration.json.

    python benchmarks/after_t_estimator.py -d 990 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerMbLS --out /tmp/est
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, markdown_table, save_json  # noqa: E402

N_BINS = 15


def ece(confidence: np.ndarray, correct: np.ndarray, weight: np.ndarray) -> float:
    """Weighted top-label ECE with the library's (lower, upper] equal-width bins."""
    bins = np.clip(np.ceil(confidence * N_BINS) - 1, 0, N_BINS - 1).astype(np.int64)
    gap = np.bincount(bins, weights=weight * (correct - confidence), minlength=N_BINS)
    return float(np.abs(gap).sum() / weight.sum())


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) of (C, n) probabilities."""
    z = np.log(np.maximum(probs.astype(np.float64), 1e-38)) / temperature
    z -= z.max(0)
    e = np.exp(z)
    return e / e.sum(0)


def strata(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Stratum id per voxel: (predicted class, correct, half-octave bin of 1 - confidence) at T = 1."""
    predicted, confidence = probs.argmax(0), probs.max(0)
    octave = np.clip(np.floor(-np.log2(np.maximum(1.0 - confidence, 1e-12)) * 2), 0, 47).astype(np.int64)
    return (predicted * 2 + (predicted == target)) * 48 + octave


def sample(kind: str, probs: np.ndarray, target: np.ndarray, m: int, rng: np.random.Generator):
    """Indices and weights of an estimator's sample of m voxels."""
    n = target.size
    if kind == "uniform":
        return rng.choice(n, size=min(m, n), replace=False), np.ones(min(m, n))
    ids = strata(probs, target)
    keys, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    share = max(1, m // len(keys))
    chosen, weights = [], []
    order = rng.permutation(n)
    for k in range(len(keys)):
        members = order[inverse[order] == k][:share]
        chosen.append(members)
        weights.append(np.full(members.size, counts[k] / members.size))
    return np.concatenate(chosen), np.concatenate(weights)


def errors(probs: np.ndarray, target: np.ndarray, temperature: float, sizes: list[int], seeds: int) -> dict:
    """{kind: {m: [|estimated ECE - exact ECE| per seed]}} of one (C, n) region, and the exact ECE."""
    p = tempered(probs, temperature)
    exact = ece(p.max(0), (p.argmax(0) == target).astype(np.float64), np.ones(target.size))
    out = {"exact": exact, "n": int(target.size)}
    for kind in ("uniform", "stratified"):
        out[kind] = {}
        for m in sizes:
            if m > target.size // 4:  # larger samples are close to the whole region: no information
                continue
            rows = []
            for seed in range(seeds):
                index, weight = sample(kind, probs, target, m, np.random.default_rng(seed))
                q = p[:, index]
                rows.append(abs(ece(q.max(0), (q.argmax(0) == target[index]).astype(np.float64), weight) - exact))
            out[kind][m] = rows
    return out


def keep_region(case: str, probs: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``case_reduce`` of evaluate_folder: the region's (C, n) probabilities and (n,) labels."""
    return probs.reshape(probs.shape[0], -1)[:, mask.reshape(-1)], ref.reshape(-1)[mask.reshape(-1)]


def summary(rows: list[float]) -> dict:
    return {"mean": float(np.mean(rows)), "p95": float(np.percentile(rows, 95)), "n": len(rows)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-f", nargs="+", required=True)
    parser.add_argument("-tr", nargs="+", required=True)
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", help="folder for after_t_estimator.json")
    args = parser.parse_args(argv)

    from nnunet_mbls.calibration.evaluation import evaluate_folder
    from nnunet_mbls.calibration.folds import gt_folder_for, plans_of
    from nnunet_mbls.layout import FoldFolder

    results = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine_info(), "cells": {}}
    table = []
    for trainer in args.tr:
        for fold in args.f:
            folder = FoldFolder.of(args.d, args.c, fold, trainer, args.p)
            temperature = json.loads(folder.calibration_record.read_text())["temperature"]
            regions = {}
            evaluate_folder(gt_folder_for(folder.path), folder.validation, region="fg", fit_region="fg", chill=True,
                            plans=plans_of(folder.trainer_folder), progress=False, num_processes=1,
                            case_reduce=functools.partial(keep_region), on_case=regions.__setitem__)
            per_case = {case: errors(p, t, temperature, args.sizes, args.seeds) for case, (p, t) in regions.items()}
            pooled = errors(np.concatenate([p for p, _ in regions.values()], 1),
                            np.concatenate([t for _, t in regions.values()]), temperature, args.sizes, args.seeds)
            cell = {"temperature": temperature, "cases": len(regions), "per_case": per_case, "pooled": pooled}
            results["cells"][f"{trainer} fold {fold}"] = cell
            for scope, runs in (("per case", list(per_case.values())), ("pooled", [pooled])):
                for kind in ("uniform", "stratified"):
                    for m in args.sizes:
                        rows = [e for run in runs for e in run[kind].get(m, [])]
                        if rows:
                            s = summary(rows)
                            table.append([trainer, fold, f"{temperature:.3f}", scope,
                                          int(np.median([run["n"] for run in runs])), kind, m,
                                          f"{s['mean']:.2e}", f"{s['p95']:.2e}"])
    print(markdown_table(["trainer", "fold", "T", "scope", "region voxels (median)", "estimator", "m",
                          "mean |ECE error|", "95th pct"], table))
    if args.out:
        save_json(os.path.join(args.out, "after_t_estimator.json"), results)
    return results


if __name__ == "__main__":
    main()
