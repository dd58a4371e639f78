"""nnunet_mbls.calibration.region_statistics and the region step's pooled sample, against naive loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mbls.calibration.folds.region_step import pooled_sample
from nnunet_mbls.calibration.region_statistics import (N_BINS, RegionCaseStatistics, RegionSettings, binary_bins,
                                                       binary_metrics, region_case_statistics)
from nnunet_mbls.calibration.region_voxels import smallest_keys
from nnunet_mbls.calibration.subsample import case_seed


def test_binary_bins_and_metrics_equal_a_loop_over_voxels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, generator=g) * 4
    y = torch.rand(500, generator=g) < 0.3
    bins, nll = binary_bins(z, y)
    naive = np.zeros((3, N_BINS))
    total = 0.0
    for zi, yi in zip(z.tolist(), y.tolist()):
        p = 1 / (1 + np.exp(-zi))
        b = min(int(p * N_BINS), N_BINS - 1)
        naive[:, b] += (1, p, yi)
        total -= np.log(p) if yi else np.log(1 - p)
    np.testing.assert_allclose(bins, naive, rtol=1e-9, atol=1e-9)
    metrics = binary_metrics(bins, nll)
    assert metrics["nll"] == pytest.approx(total / 500, rel=1e-6)
    assert metrics["ece"] == pytest.approx(sum(abs(naive[1, b] - naive[2, b]) for b in range(N_BINS)) / 500, rel=1e-9)
    assert np.isnan(binary_metrics(np.zeros((3, N_BINS)), 0.0)["ece"])


def test_case_statistics_use_the_crop_box_in_the_transposed_frame_and_skip_ignored_voxels(tmp_path):
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 4, size=(6, 7, 5)).astype(np.uint8)  # labels 0..2, 3 = ignore
    order = [2, 0, 1]
    box = [[1, 4], [0, 6], [2, 7]]  # in the transposed frame (5, 6, 7)
    logits = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(2)) * 3
    settings = RegionSettings(regions=((1, 2), (2,)), ignore_label=3, seed=0, capacity=40)
    stats = region_case_statistics("c", logits, ref, {"bbox_used_for_cropping": box}, order, settings)
    ref_c = ref.transpose(order)[1:4, 0:6, 2:7]
    scored = ref_c != 3
    for r, labels in enumerate(settings.regions):
        bins, nll = binary_bins(logits[r][torch.from_numpy(scored)], torch.from_numpy(np.isin(ref_c[scored], labels)))
        np.testing.assert_allclose(stats.bins[r], bins)
        assert stats.nll[r] == pytest.approx(nll)
    # the kept voxels: those with the 40 smallest keys of the case's generator, the same for both regions
    keys, positions = smallest_keys(int(scored.sum()), 40, case_seed(0, "c"))
    np.testing.assert_array_equal(stats.keys, np.sort(keys))
    flat = logits[:, torch.from_numpy(scored)].numpy()
    np.testing.assert_array_equal(stats.logits, flat[:, positions[np.argsort(keys)]])
    np.testing.assert_array_equal(stats.targets[1], np.isin(ref_c[scored], [2])[positions[np.argsort(keys)]])
    loaded = RegionCaseStatistics.load(stats.save(tmp_path / "c.npz"))
    np.testing.assert_array_equal(loaded.logits, stats.logits)
    assert loaded.case == "c"


def test_pooled_sample_is_the_smallest_keys_of_all_voxels():
    """Cases that kept part of their voxels: the pooled sample is exactly the voxels with the smallest keys over
    every voxel of every case (known here by drawing all keys)."""
    sizes, capacity, seed = [300, 50, 800], 100, 3
    statistics, every = [], []
    for i, n in enumerate(sizes):
        keys, _ = smallest_keys(n, capacity, case_seed(seed, f"c{i}"))
        all_keys, _ = smallest_keys(n, n, case_seed(seed, f"c{i}"))
        every.append(np.sort(all_keys))
        bins = np.zeros((1, 3, N_BINS))
        bins[0, 0, 0] = n
        statistics.append(RegionCaseStatistics(f"c{i}", bins, np.zeros(1), np.sort(keys), np.zeros((1, keys.size), np.float32),
                                               np.zeros((1, keys.size), bool)))
    for max_voxels in (60, 150, 10_000):
        kept = pooled_sample(statistics, max_voxels)
        chosen = np.sort(np.concatenate([s.keys[k] for s, k in zip(statistics, kept)]))
        pooled = np.sort(np.concatenate(every))
        assert chosen.size <= max_voxels
        np.testing.assert_array_equal(chosen, pooled[: chosen.size])  # a prefix of all keys: uniform
        assert chosen.size >= min(max_voxels, capacity) * 0.5
