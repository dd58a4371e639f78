"""nnunet_mbls.calibration.metrics: calibration metrics against independent references (torchmetrics, naive loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from nnunet_mbls.calibration import METRIC_KEYS, CalibrationAccumulator, aggregate, bin_index

from helpers.probabilities import N_BINS, random_case


def naive_reference(p: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Plain numpy loops over classes and (lower, upper] bins; p (N, C) float64, y (N,)."""
    n, c = p.shape
    edges = np.linspace(0.0, 1.0, n_bins + 1)

    def in_bin(v: np.ndarray, b: int) -> np.ndarray:
        return ((v > edges[b]) & (v <= edges[b + 1])) | ((v == 0) if b == 0 else False)

    def binned_error(conf: np.ndarray, hit: np.ndarray) -> float:
        err = 0.0
        for b in range(n_bins):
            sel = in_bin(conf, b)
            if sel.any():
                err += sel.sum() / n * abs(hit[sel].mean() - conf[sel].mean())
        return err

    def max_error(conf: np.ndarray, hit: np.ndarray) -> float:
        gaps = [abs(hit[in_bin(conf, b)].mean() - conf[in_bin(conf, b)].mean()) for b in range(n_bins)
                if in_bin(conf, b).any()]
        return max(gaps)

    conf, pred = p.max(1), p.argmax(1)
    onehot = np.eye(c)[y]
    rel = {"count": np.array([in_bin(conf, b).sum() for b in range(n_bins)], float)}
    for key, values in (("confidence", conf), ("accuracy", (pred == y).astype(float))):
        rel[key] = np.array([values[in_bin(conf, b)].mean() if rel["count"][b] else np.nan for b in range(n_bins)])
    return {
        "ece": binned_error(conf, (pred == y).astype(float)),
        "mce": max_error(conf, (pred == y).astype(float)),
        "cece": np.mean([binned_error(p[:, k], (y == k).astype(float)) for k in range(c)]),
        "nll": float(np.mean(-np.log(np.maximum(p[np.arange(n), y], 1e-12)))),
        "brier": float(np.mean(((p - onehot) ** 2).sum(1))),
        "reliability": rel,
    }


def metrics_of(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, **kw) -> dict:
    acc = CalibrationAccumulator(probs.shape[0], **kw)
    acc.update(probs, target, mask)
    return acc.compute()


def assert_same_metrics(a: dict, b: dict, rtol: float = 1e-9) -> None:
    assert a["n_voxels"] == b["n_voxels"]
    assert set(METRIC_KEYS) == {"ece", "cece", "nll", "brier", "mce", "ece_adaptive"}
    for k in METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-12), k


@pytest.mark.parametrize("shape", [(6, 20, 25), (40, 30)])
def test_ece_matches_torchmetrics(shape):
    probs, target = random_case(4, shape, seed=1)
    tm = MulticlassCalibrationError(num_classes=4, n_bins=N_BINS, norm="l1")
    tm.update(probs[None], target[None])  # torchmetrics layout (B, C, *spatial)
    ours = metrics_of(probs, target)
    assert ours["ece"] == pytest.approx(float(tm.compute()), abs=1e-6)
    assert ours["ece"] > 0.01  # the data are miscalibrated on purpose, so the check is not vacuous


def test_cece_nll_brier_reliability_match_naive_loops():
    probs, target = random_case(3, (50, 40), seed=2)
    ref = naive_reference(probs.reshape(3, -1).T.double().numpy(), target.reshape(-1).numpy())
    acc = CalibrationAccumulator(3)
    acc.update(probs, target)
    ours = acc.compute()
    for k in ("ece", "cece", "nll", "brier"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-5), k
    rel = acc.reliability()
    np.testing.assert_array_equal(rel["count"], ref["reliability"]["count"])
    np.testing.assert_allclose(rel["confidence"], ref["reliability"]["confidence"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(rel["accuracy"], ref["reliability"]["accuracy"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(rel["bin_lower"], np.arange(N_BINS) / N_BINS)
    assert np.isnan(rel["confidence"][0])  # no 3-class max-probability can be <= 1/15


@pytest.mark.parametrize("num_classes", [3, 40])  # 40: class-wise bins filled sparsely (SPARSE_CLASSWISE_FROM)
def test_classwise_states_match_naive_loops_for_few_and_many_classes(num_classes):
    from nnunet_mbls.calibration.bins import SPARSE_CLASSWISE_FROM

    assert 3 < SPARSE_CLASSWISE_FROM <= 40
    probs, target = random_case(num_classes, (60, 50), seed=5)
    ref = naive_reference(probs.reshape(num_classes, -1).T.double().numpy(), target.reshape(-1).numpy())
    acc = CalibrationAccumulator(num_classes)
    acc.update(probs, target)
    for k in ("ece", "cece", "nll", "brier"):
        assert acc.compute()[k] == pytest.approx(ref[k], rel=1e-6), k
    # per class and bin, counts exactly as numpy bins them (upper-inclusive edges)
    p, y = probs.reshape(num_classes, -1).double().numpy(), target.reshape(-1).numpy()
    bins = np.clip(np.ceil(p * N_BINS) - 1, 0, N_BINS - 1).astype(int)
    counts = np.stack([np.bincount(bins[k], minlength=N_BINS) for k in range(num_classes)])
    freqs = np.stack([np.bincount(bins[k], weights=(y == k), minlength=N_BINS) for k in range(num_classes)])
    states = dict(zip(CalibrationAccumulator.STATE_NAMES, acc.state_tensors()))
    np.testing.assert_array_equal(states["cls_count"].numpy(), counts)
    np.testing.assert_array_equal(states["cls_freq"].numpy(), freqs)


def test_classwise_ece_averages_over_all_classes_even_absent_ones():
    probs, target = random_case(3, (30, 30), seed=17)
    target[target == 2] = 0  # class 2 never occurs, but its probabilities still count
    ref = naive_reference(probs.reshape(3, -1).T.double().numpy(), target.reshape(-1).numpy())
    assert metrics_of(probs, target)["cece"] == pytest.approx(ref["cece"], rel=1e-5)


def test_bin_edges_are_upper_inclusive():
    # 4 bins; confidences 0.5 and 0.75 lie exactly on edges (exact in binary floating point)
    probs = torch.tensor([[0.5, 0.75, 0.8], [0.5, 0.25, 0.2]])
    acc = CalibrationAccumulator(2, n_bins=4)
    acc.update(probs, torch.tensor([0, 0, 1]))
    np.testing.assert_array_equal(acc.reliability()["count"], [0, 1, 1, 1])  # (0.25, 0.5], (0.5, 0.75], (0.75, 1]


def test_exact_zero_and_one_probabilities_are_binned_not_dropped():
    target = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])
    onehot = torch.nn.functional.one_hot(target, 3).permute(2, 0, 1).float()  # p in {0, 1} exactly
    acc = CalibrationAccumulator(3)
    acc.update(onehot, target)
    assert acc.compute() == {"ece": 0.0, "cece": 0.0, "nll": 0.0, "brier": 0.0, "mce": 0.0, "ece_adaptive": 0.0,
                             "n_voxels": 8}
    assert acc.reliability()["count"][-1] == 8  # p = 1 in the last bin
    cls_count = acc.state_tensors()[CalibrationAccumulator.STATE_NAMES.index("cls_count")]
    assert cls_count[:, 0].sum() == 16 and cls_count.sum() == 24  # p = 0 in bin 0

    wrong = torch.roll(onehot, 1, dims=0)  # confidently wrong everywhere
    m = metrics_of(wrong, target)
    assert m["ece"] == 1.0 and m["brier"] == 2.0 and m["mce"] == 1.0 and m["ece_adaptive"] == 1.0
    assert m["nll"] == pytest.approx(-math.log(1e-12))
    assert m["cece"] == pytest.approx(2 / 3)  # per class: |freq - conf| = 1 on its 1-voxels and 0-voxels


def test_mask_equals_selected_voxels():
    probs, target = random_case(3, (12, 11), seed=3)
    mask = target != 0
    selected = metrics_of(probs[:, mask], target[mask])
    assert_same_metrics(metrics_of(probs, target, mask), selected)
    assert metrics_of(probs, target, mask)["n_voxels"] == int(mask.sum())


def test_streaming_over_chunks_and_updates_equals_one_shot():
    probs, target = random_case(4, (8, 15, 13), seed=4)
    one_shot = CalibrationAccumulator(4)
    one_shot.update(probs, target)
    streamed = CalibrationAccumulator(4)
    streamed.chunk_voxels = 37  # many ragged chunks
    for z in range(0, 8, 3):
        streamed.update(probs[:, z : z + 3], target[z : z + 3])
    assert_same_metrics(streamed.compute(), one_shot.compute(), rtol=1e-12)
    for a, b in zip(streamed.state_tensors(), one_shot.state_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


def pooled_and_per_case(cases, num_classes: int) -> tuple[CalibrationAccumulator, list[CalibrationAccumulator]]:
    """One accumulator updated with every case, and one accumulator per case."""
    pooled, parts = CalibrationAccumulator(num_classes), []
    for probs, target in cases:
        pooled.update(probs, target)
        part = CalibrationAccumulator(num_classes)
        part.update(probs, target)
        parts.append(part)
    return pooled, parts


def test_merge_and_summed_states_equal_pooled():
    cases = [random_case(3, (9, 10), seed=s) for s in (5, 6, 7)]
    pooled, parts = pooled_and_per_case(cases, 3)
    merged = CalibrationAccumulator(3)
    merged.merge(parts[0])
    merged += parts[1]
    merged += parts[2]
    assert_same_metrics(merged.compute(), pooled.compute())
    # what an all_reduce(SUM) over ranks does to state_tensors()
    reduced = CalibrationAccumulator(3)
    reduced.load_state_tensors([sum(ts) for ts in zip(*(p.state_tensors() for p in parts))])
    assert_same_metrics(reduced.compute(), pooled.compute())
    with pytest.raises(ValueError, match="n_bins"):
        merged.merge(CalibrationAccumulator(3, n_bins=10))


def test_per_case_aggregation_equals_manual_mean_and_ignores_empty_cases():
    cases = [random_case(3, (10, 10), seed=s) for s in (8, 9, 10)]
    per_case = [metrics_of(p, t) for p, t in cases]
    empty_probs, empty_target = cases[0]
    per_case.append(metrics_of(empty_probs, empty_target, torch.zeros_like(empty_target, dtype=torch.bool)))
    assert math.isnan(per_case[-1]["ece"]) and per_case[-1]["n_voxels"] == 0
    agg = aggregate(per_case)
    for k in METRIC_KEYS:
        values = [d[k] for d in per_case[:3]]
        assert agg[k] == pytest.approx(sum(values) / 3)
        assert agg[f"{k}_std"] == pytest.approx(float(np.std(values, ddof=1)))
        assert agg[f"{k}_n"] == 3
    assert agg["n_cases"] == 4 and agg["n_voxels"] == 300
    # per case then mean differs from pooled in general
    pooled = CalibrationAccumulator(3)
    for p, t in cases:
        pooled.update(p, t)
    assert agg["ece"] != pytest.approx(pooled.compute()["ece"], rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        aggregate([])


def test_float16_input_close_to_float32():
    probs, target = random_case(3, (30, 30), seed=11)
    a, b = metrics_of(probs, target), metrics_of(probs.half(), target)
    for k in ("ece", "cece", "nll", "brier"):
        assert b[k] == pytest.approx(a[k], abs=2e-3)


def _with(x: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p, t: (p[:, :3], t, None), r"target shape \(4, 5\) does not match probs spatial shape \(3, 5\)"),
        (lambda p, t: (_with(p, (0, 3, 4), float("nan")), t, None), "NaN/Inf"),
        (lambda p, t: (p, _with(t, (3, 4), 7), None), r"labels \[7\]"),
        (lambda p, t: (p * 4 - 1, t, None), "apply softmax"),
        (lambda p, t: (p, t, (t != 0).int()), "mask must be a bool"),
        (lambda p, t: (p, t.float(), None), "integer labels"),
        (lambda p, t: (p, t, torch.ones(3, 5, dtype=torch.bool)), r"mask shape \(3, 5\)"),
    ],
)
def test_invalid_input_raises_and_leaves_states_unchanged(make, message):
    probs, target = random_case(3, (4, 5), seed=12)
    acc = CalibrationAccumulator(3)
    acc.chunk_voxels = 7  # bad voxels sit in the last chunk, after good chunks were already summed
    acc.update(probs, target)
    before = [t.clone() for t in acc.state_tensors()]
    with pytest.raises(ValueError, match=message):
        acc.update(*make(probs, target))
    for a, b in zip(acc.state_tensors(), before):
        assert torch.equal(a, b)


def test_masked_out_bad_labels_are_accepted_and_bad_arguments_rejected():
    probs, target = random_case(3, (4, 5), seed=13)
    target[0, 0] = 3  # e.g. nnU-Net's ignore label == number of classes
    assert metrics_of(probs, target, target != 3)["n_voxels"] == 19
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        CalibrationAccumulator(0)
    with pytest.raises(ValueError, match="n_bins"):
        CalibrationAccumulator(3, n_bins=1.5)
    with pytest.raises(ValueError, match="num_classes=4"):
        CalibrationAccumulator(4).update(probs, target)


def test_empty_accumulator_and_reset():
    acc = CalibrationAccumulator(2)
    assert acc.compute()["n_voxels"] == 0 and math.isnan(acc.compute()["ece"])
    assert all(math.isnan(acc.compute()[k]) for k in METRIC_KEYS)
    assert np.isnan(acc.reliability()["accuracy"]).all()
    adaptive = acc.adaptive_reliability()
    assert math.isnan(adaptive["ece"]) and math.isnan(adaptive["max_error"]) and not adaptive["count"].any()
    probs, target = random_case(2, (5, 5), seed=14)
    acc.update(probs, target)
    acc.reset()
    assert math.isnan(acc.compute()["nll"]) and math.isnan(acc.compute()["ece_adaptive"])
    masked_out = CalibrationAccumulator(2)
    masked_out.update(probs, target, torch.zeros_like(target, dtype=torch.bool))
    assert math.isnan(masked_out.compute()["mce"]) and math.isnan(masked_out.compute()["ece_adaptive"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_states_match_cpu():
    probs, target = random_case(3, (20, 20), seed=15)
    acc = CalibrationAccumulator(3)
    acc.update(probs.cuda(), target.cuda(), (target != 0).cuda())
    assert acc.device.type == "cuda"
    assert_same_metrics(acc.compute(), metrics_of(probs, target, target != 0), rtol=1e-6)


# ---- maximum calibration error and adaptive (equal-mass) ECE --------------------------------------------
def exact_adaptive_ece(conf: np.ndarray, hit: np.ndarray, n_bins: int = N_BINS) -> float:
    """Equal-mass ECE the direct way: sort the confidences, split into n_bins equal-count groups."""
    order = np.argsort(conf, kind="stable")
    groups = zip(np.array_split(conf[order].astype(np.float64), n_bins),
                 np.array_split(hit[order].astype(float), n_bins))
    return sum(len(c) / conf.size * abs(h.mean() - c.mean()) for c, h in groups if len(c))


def conf_hit(probs: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and hit (argmax == target) per voxel, numpy (N,), from probs (C, *spatial)."""
    p = probs.reshape(probs.shape[0], -1).numpy()
    return p.max(0), p.argmax(0) == target.reshape(-1).numpy()


def relabel(probs: torch.Tensor, slope: float, shift: float, seed: int) -> torch.Tensor:
    """Labels with P(label = argmax) = sigmoid(slope * logit(confidence) + shift), else another class.

    The calibration gap changes sign where slope * L + shift = L: with one sign everywhere, every binning
    gives the same ECE (|mean accuracy - mean confidence|) and an equal-mass test could not fail."""
    g = torch.Generator().manual_seed(seed)
    conf, pred = probs.double().max(0)
    p_hit = torch.sigmoid(slope * (conf.log() - torch.log1p(-conf.clamp(max=1 - 1e-15))) + shift)
    hit = torch.rand(conf.shape, generator=g, dtype=torch.float64) < p_hit
    other = (pred + 1 + torch.randint(probs.shape[0] - 1, conf.shape, generator=g)) % probs.shape[0]
    return torch.where(hit, pred, other)


def peaked_probs(c: int, n: int, seed: int) -> torch.Tensor:
    """(C, n) float32 softmax of segmentation-like logits: the true class ahead by N(9, 3^2), so that most
    confidences lie within 1e-4 of 1 (the log-spaced fine bins), some exactly 1 and some below 1/2."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(c, n, generator=g)
    z[torch.randint(c, (n,), generator=g), torch.arange(n)] += torch.randn(n, generator=g) * 3 + 9
    return torch.softmax(z, dim=0)


@pytest.mark.parametrize("shape, seed", [((6, 20, 25), 1), ((40, 30), 21)])
def test_mce_matches_torchmetrics_max_norm_and_naive_loop(shape, seed):
    probs, target = random_case(4, shape, seed=seed)
    conf, _ = conf_hit(probs, target)
    assert conf.max() < 1.0  # torchmetrics puts p = 1 in a bin of its own
    tm = MulticlassCalibrationError(num_classes=4, n_bins=N_BINS, norm="max")
    tm.update(probs[None], target[None])
    ours = metrics_of(probs, target)
    assert ours["mce"] == pytest.approx(float(tm.compute()), abs=1e-6)
    ref = naive_reference(probs.reshape(4, -1).T.double().numpy(), target.reshape(-1).numpy())
    assert ours["mce"] == pytest.approx(ref["mce"], rel=1e-6)
    assert ours["mce"] > 2 * ours["ece"] > 0.02  # a max over bins, not the weighted mean


def test_mce_by_hand_ignores_empty_bins():
    # 4 bins: (0.5, 0.75] holds 0.6 (hit) and 0.7 (miss): |0.5 - 0.65| = 0.15; (0.75, 1] holds 0.8 (hit): 0.2
    probs = torch.tensor([[0.6, 0.7, 0.8], [0.4, 0.3, 0.2]])
    m = metrics_of(probs, torch.tensor([0, 1, 0]), n_bins=4)
    assert m["mce"] == pytest.approx(0.2) and m["ece"] == pytest.approx((0.15 * 2 + 0.2) / 3)
    m = metrics_of(probs[:, :2], torch.tensor([0, 1]), n_bins=4)
    assert m["mce"] == pytest.approx(0.15)  # the empty bins (gap 0 - 0) neither win nor divide by zero


#: |ece_adaptive - exact| allowed; worst measured on these data: 1.3e-4 (random, 20 seeds), 9.9e-5 (peaked, 30 seeds)
ADAPTIVE_TOLERANCE = {"random": 2e-4, "peaked": 2e-4}


@pytest.mark.parametrize("kind, seed", [("random", 3), ("random", 5), ("peaked", 5), ("peaked", 6)])
def test_adaptive_ece_matches_exact_equal_mass_split(kind, seed):
    if kind == "random":  # 30000 voxels, softmax confidences in (1/4, 1), over- then under-confident
        probs = random_case(4, (150, 200), seed=seed)[0].reshape(4, -1)
        target = relabel(probs, slope=4.0, shift=-2.0, seed=seed)
    else:  # 20000 voxels, a third of them within 2**-13 of 1, gap sign changes at confidence 0.993
        probs = peaked_probs(4, 20_000, seed)
        target = relabel(probs, slope=0.7, shift=1.5, seed=seed)
    conf, hit = conf_hit(probs, target)
    if kind == "peaked":
        assert (1 - conf < 2.0**-13).mean() > 0.25 and (conf == 1).any()
    acc = CalibrationAccumulator(4)
    acc.update(probs, target)
    ours, exact = acc.compute(), exact_adaptive_ece(conf, hit)
    tol = ADAPTIVE_TOLERANCE[kind]
    assert ours["ece_adaptive"] == pytest.approx(exact, abs=tol)
    # the a-posteriori bound holds, and the data tell equal-mass from equal-width bins apart
    curve = acc.adaptive_reliability()
    assert abs(ours["ece_adaptive"] - exact) <= curve["max_error"] + 1e-12
    assert curve["ece"] == ours["ece_adaptive"]
    assert abs(ours["ece"] - exact) > 3 * tol
    # equal mass: every bin holds N / n_bins voxels up to the fine bins that straddle a boundary
    assert curve["count"].sum() == conf.size
    assert np.abs(curve["count"] - conf.size / N_BINS).max() < 0.1 * conf.size / N_BINS


#: 1 - confidence in [2**-lo, 2**-hi] and accuracy of the 4 equal-mass bins of aligned_case next to 1
ALIGNED_TAIL = {11: (7.5, 8.5, 0.5), 12: (12.3, 12.5, 1.0), 13: (14.0, 14.5, 0.5), 14: (17.0, 17.5, 1.0)}


def aligned_case() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """607 voxels whose 15 exact equal-mass bins (41 voxels in the first 607 mod 15 = 7, then 40) occupy
    disjoint confidence ranges far apart compared with the fine bins: 11 ranges of width 0.03 in
    [0.3, 0.83], 4 within 2**-7.5 .. 2**-17.5 of 1 (ALIGNED_TAIL, log-spaced fine bins); the gap
    acc - conf alternates in sign below 0.83, so that merging two neighbours would change the ECE.
    Returns probs (4, N), labels (N,) and the bin of each voxel (N,)."""
    rng = np.random.default_rng(0)
    sizes = [41] * 7 + [40] * 8
    conf, hit, group = [], [], []
    for g, n in enumerate(sizes):
        if g < 11:
            c = 0.3 + 0.05 * g + 0.03 * rng.random(n)
            accuracy = c.mean() + (0.2 if g % 2 else -0.2)
        else:
            lo, hi, accuracy = ALIGNED_TAIL[g]
            c = 1 - 2.0 ** -(lo + (hi - lo) * rng.random(n))
        c = c.astype(np.float32)
        h = np.zeros(n, bool)
        h[: int(round(accuracy * n))] = True
        conf.append(c), hit.append(rng.permutation(h)), group.append(np.full(n, g))
    order = rng.permutation(sum(sizes))  # voxel order must not matter
    conf, hit, group = (np.concatenate(x)[order] for x in (conf, hit, group))
    rest = (1 - conf) / 3
    probs = torch.from_numpy(np.stack([conf, rest, rest, rest]))
    return probs, torch.from_numpy(np.where(hit, 0, 1)), group


def test_adaptive_ece_is_exact_when_fine_bins_do_not_straddle_boundaries():
    probs, target, group = aligned_case()
    conf, hit = conf_hit(probs, target)
    exact = exact_adaptive_ece(conf, hit)
    by_hand = sum(abs(hit[group == g].mean() - conf[group == g].astype(float).mean()) * (group == g).sum()
                  for g in range(N_BINS)) / conf.size
    assert exact == pytest.approx(by_hand, abs=1e-15)  # the exact split is the construction's groups
    acc = CalibrationAccumulator(4)
    acc.chunk_voxels = 100
    acc.update(probs, target)
    assert acc.compute()["ece_adaptive"] == pytest.approx(exact, abs=1e-12)
    curve = acc.adaptive_reliability()
    assert curve["max_error"] == 0.0
    np.testing.assert_array_equal(curve["count"], [41] * 7 + [40] * 8)
    np.testing.assert_allclose(curve["accuracy"], [hit[group == g].mean() for g in range(N_BINS)], rtol=1e-12)
    np.testing.assert_allclose(curve["confidence"], [conf[group == g].astype(float).mean() for g in range(N_BINS)],
                               rtol=1e-12)
    assert (curve["bin_lower"] <= curve["confidence"]).all() and (curve["confidence"] <= curve["bin_upper"]).all()
    # bins 12-14 are only told apart by the log-spaced fine bins (they share one equal-width fine bin of
    # width 1/4110): merging them, as a plain 4096-bin histogram would, changes the value
    tail = group >= 12
    merged = (by_hand * conf.size - sum(abs(hit[group == g].sum() - conf[group == g].astype(float).sum())
                                        for g in (12, 13, 14))
              + abs(hit[tail].sum() - conf[tail].astype(float).sum())) / conf.size
    assert abs(merged - exact) > 1e-5
    # with one bin, adaptive and equal-width ECE are both |mean accuracy - mean confidence|
    one = CalibrationAccumulator(4, n_bins=1)
    one.update(probs, target)
    assert one.compute()["ece_adaptive"] == pytest.approx(abs(hit.mean() - conf.astype(float).mean()), abs=1e-12)


def test_new_metrics_of_merged_per_case_accumulators_equal_pooled():
    cases = [(p, relabel(p, 0.7, 1.5, seed=s)) for s, p in ((31, peaked_probs(4, 3000, 31)),
                                                               (32, peaked_probs(4, 500, 32)))]
    cases.append(random_case(4, (30, 40), seed=33))
    cases = [(p.reshape(4, -1), t.reshape(-1)) for p, t in cases]
    pooled, parts = pooled_and_per_case(cases, 4)
    merged = CalibrationAccumulator(4)
    for part in parts:
        merged += part
    reduced = CalibrationAccumulator(4)  # what all_reduce(SUM) over ranks does
    reduced.load_state_tensors([sum(ts) for ts in zip(*(p.state_tensors() for p in parts))])
    all_probs, all_target = torch.cat([p for p, _ in cases], 1), torch.cat([t for _, t in cases])
    conf, hit = conf_hit(all_probs, all_target)
    ref = naive_reference(all_probs.T.double().numpy(), all_target.numpy())
    for acc in (merged, reduced):
        m = acc.compute()
        assert m["ece_adaptive"] == pytest.approx(pooled.compute()["ece_adaptive"], abs=1e-15)
        assert m["mce"] == pytest.approx(pooled.compute()["mce"], rel=1e-12)
        assert m["ece_adaptive"] == pytest.approx(exact_adaptive_ece(conf, hit), abs=2e-4)
        assert m["mce"] == pytest.approx(ref["mce"], rel=1e-6)
    # and it is not the mean of the per-case values
    per_case = aggregate([p.compute() for p in parts])
    assert per_case["ece_adaptive"] != pytest.approx(merged.compute()["ece_adaptive"], rel=1e-3)
    assert per_case["mce"] != pytest.approx(merged.compute()["mce"], rel=1e-3)


def test_fine_states_stay_fixed_size_and_refine_the_top_label_bins():
    acc = CalibrationAccumulator(3)
    sizes = [t.numel() for t in acc.state_tensors()]
    assert acc.STATE_NAMES[:9] == ("top_count", "top_conf", "top_acc", "cls_count", "cls_prob", "cls_freq",
                                   "nll_sum", "brier_sum", "n_voxels")  # flat vectors of older code still line up
    probs, target = random_case(3, (50, 40), seed=34)
    acc.update(probs, target)
    acc.update(peaked_probs(3, 5000, 35), torch.zeros(5000, dtype=torch.long))
    assert [t.numel() for t in acc.state_tensors()] == sizes and sum(sizes) < 20_000
    s = dict(zip(acc.STATE_NAMES, acc.state_tensors()))
    assert float(s["fine_count"].sum()) == float(s["n_voxels"]) == 7000
    for coarse, fine in (("top_count", "fine_count"), ("top_acc", "fine_acc"), ("top_conf", "fine_conf")):
        assert float(s[coarse].sum()) == pytest.approx(float(s[fine].sum()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fine_bins_are_ordered_by_confidence_and_hold_what_their_edges_say(dtype):
    """Equal-mass bins need the fine index to be non-decreasing in the confidence; the error bound needs
    every confidence inside its fine bin's nominal (lower, upper] range. Checked on dense and edge values."""
    acc = CalibrationAccumulator(3)
    a = acc.tail_start
    edges = [b / N_BINS for b in range(N_BINS + 1)] + [1 - 2.0**-a, 1 - 2.0**-24, 1 - 2.0**-30, 1.0, 1.0005]
    conf = torch.cat([torch.linspace(0, 1, 200_001, dtype=torch.float64),
                      1 - torch.logspace(-1, -30, 5000, 2.0, dtype=torch.float64),
                      torch.tensor(edges, dtype=torch.float64)]).to(dtype)
    conf = torch.cat([conf, torch.nextafter(conf, torch.zeros_like(conf)), torch.nextafter(conf, torch.ones_like(conf))])
    conf = conf.clamp(0, 1.001).sort().values
    index = acc._fine_index(conf.clone())
    assert index.dtype == dtype and (index == index.round()).all()
    index = index.long().numpy()
    assert (np.diff(index) >= 0).all() and index.min() == 0 and index.max() == acc.n_fine - 1
    lower, upper = acc._fine_edges()
    # every fine bin is reached, in float32 except some within 2**-18 of 1: narrower than its spacing 2**-24
    missed = np.setdiff1d(np.arange(acc.n_fine), index)
    assert (lower[missed] > 1 - 2.0**-18).all() if dtype == torch.float32 else missed.size == 0
    c = conf.double().numpy()
    inside = ((lower[index] - 1e-7 < c) | (index == 0)) & (c <= upper[index] + 1e-7)
    assert inside[c <= 1].all()
    # the fine bins refine the n_bins bins exactly, with bin_index's own rounding
    coarse = torch.bincount(bin_index(conf, N_BINS), minlength=N_BINS)
    below = (N_BINS - 1) * acc.fine_per_bin
    from_fine = np.bincount(np.minimum(index // acc.fine_per_bin, N_BINS - 1), minlength=N_BINS)
    assert index[index >= below].size == int(coarse[-1]) and (from_fine == coarse.numpy()).all()
