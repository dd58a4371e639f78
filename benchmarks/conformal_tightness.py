"""What calibration buys under conformal guarantees: mask sizes and interval widths at the same α, on generated
cases whose truth is known (no nnU-Net run; seconds).

Cases: 2D discs (32x32, the tests' generator) segmented by a model whose predicted radius is off by a per-case
relative error ε ~ N(0, s_i), s_i ~ U(0.03, 0.25) (some cases are harder than others). Three probability maps of
the same predictions:
- ``overconfident``: a sharp edge, p = σ(3·(r̂ − d)), whatever the case's difficulty;
- ``overconfident + T``: the same with one temperature fitted on the calibration cases' voxels (NLL);
- ``case-aware``: p = Φ((r̂ − d) / (s_i·r̂)), an edge as wide as the case's radius error (calibrated across cases).
For each, on random calibration/test splits (200/200; means over splits, as the guarantees are), ``nnunet-mbls conformal``'s rules are fitted at α on the
calibration cases and measured on the test cases: FNR and FDR (risk ≤ α guaranteed), the masks' volume relative to
the truth, the volume interval's coverage (≥ 1 − α guaranteed) and width relative to the true volume.

    python benchmarks/conformal_tightness.py [--splits 20] [--alpha 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.special import expit
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median, save_json  # noqa: E402

from nnunet_mbls.calibration.conformal.curves import case_curves  # noqa: E402
from nnunet_mbls.calibration.conformal.rules import fit_rules  # noqa: E402
from nnunet_mbls.calibration.temperature import fit_temperature  # noqa: E402


def generate(num_cases: int, seed: int, size: int = 32):
    """Per case: reference, the predicted map's logit of each model (overconfident, case-aware)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cases = []
    for _ in range(num_cases):
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        radius, spread = rng.uniform(size * 0.15, size * 0.3), rng.uniform(0.03, 0.25)
        predicted = radius * (1 + rng.normal(0, spread))
        d = np.hypot(yy - cy, xx - cx)
        aware = norm.cdf((predicted - d) / (spread * predicted))
        cases.append(((d <= radius).astype(np.int64), 3.0 * (predicted - d),
                      np.log(np.clip(aware, 1e-12, 1)) - np.log(np.clip(1 - aware, 1e-12, 1))))
    return cases


def measure(curves_cal, curves_test, alpha: float) -> dict:
    fit = fit_rules(curves_cal, {1: "disc"}, ["fnr", "fdr", "volume"], alpha)["labels"]["disc"]
    fnr_g, fdr_g = fit["fnr"]["grid_index"], fit["fdr"]["grid_index"]
    lo, hi = fit["volume"]["low_volume_grid_index"], fit["volume"]["high_volume_grid_index"]
    ref = np.array([c.reference_voxels()[0] for c in curves_test], dtype=float)
    mask = lambda g: np.array([c.mask_voxels()[0, g] for c in curves_test], dtype=float)  # noqa: E731
    return {"fnr": np.mean([c.false_negative_rate()[0, fnr_g] for c in curves_test]),
            "fnr_volume": np.mean(mask(fnr_g) / ref),
            "fdr": np.mean([c.false_discovery_rate()[0, fdr_g] for c in curves_test]),
            "fdr_volume": np.mean(mask(fdr_g) / ref),
            "coverage": np.mean((mask(lo) <= ref) & (ref <= mask(hi))),
            "width": np.mean((mask(hi) - mask(lo)) / ref)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = generate(400, seed=0)
    rng = np.random.default_rng(1)
    results = {name: [] for name in ("overconfident", "overconfident + T", "case-aware")}
    temperatures = []
    for _ in range(args.splits):
        order = rng.permutation(len(cases))
        cal, test = order[:200], order[200:]
        logits = np.concatenate([cases[i][1].ravel() for i in cal])
        target = np.concatenate([cases[i][0].ravel() for i in cal])
        t = fit_temperature(np.stack([np.zeros_like(logits), logits], 1).astype(np.float32), target)
        temperatures.append(t)
        for name, index, scale in (("overconfident", 1, 1.0), ("overconfident + T", 1, 1 / t), ("case-aware", 2, 1.0)):
            curves = [case_curves(str(i), np.stack([1 - expit(cases[i][index] * scale), expit(cases[i][index] * scale)]),
                                  cases[i][0], [1], 1.0) for i in range(len(cases))]
            results[name].append(measure([curves[i] for i in cal], [curves[i] for i in test], args.alpha))
    keys = ("fnr", "fnr_volume", "fdr", "fdr_volume", "coverage", "width")
    summary = {name: {k: float(np.mean([r[k] for r in runs])) for k in keys} for name, runs in results.items()}
    print(f"alpha {args.alpha}, {args.splits} splits of 400 cases (200 calibration / 200 test), means over splits; "
          f"fitted T median {median(temperatures):.3f}")
    print(markdown_table(["model", "test FNR", "FNR-mask vol / ref", "test FDR", "FDR-mask vol / ref",
                          "interval coverage", "interval width / ref"],
                         [[name, *(f"{s[k]:.3f}" for k in keys)] for name, s in summary.items()]))
    save_json(args.json, {"alpha": args.alpha, "splits": args.splits, "median_temperature": median(temperatures),
                          "means": summary})


if __name__ == "__main__":
    main()
