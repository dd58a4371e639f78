"""Histogram curves against naive per-threshold masks on the probabilities."""

from __future__ import annotations

import numpy as np

from nnunet_mbls.calibration.conformal.curves import CaseCurves, case_curves, mask_at, threshold_of


def test_curves_equal_naive_masks_at_every_threshold(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 7, 5)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    probabilities[1, 0, 0, 0], probabilities[2, 0, 0, 1] = 1.0, 0.0  # the ends of the grid
    reference = rng.integers(0, 4, size=(6, 7, 5))  # 3 = ignore
    grid = 20
    curves = case_curves("c", probabilities, reference, [1, 2], 0.5, ignore_label=3, grid=grid)
    keep = reference != 3
    for i, label in enumerate([1, 2]):
        structure = (reference == label) & keep
        for g in range(grid + 1):
            mask = (probabilities[label] >= threshold_of(g, grid)) & keep if g < grid else np.zeros_like(keep)
            assert (mask == (mask_at(probabilities[label], g, grid) & keep)).all()
            tp = (mask & structure).sum()
            assert curves.mask_voxels()[i, g] == mask.sum()
            assert curves.true_positives()[i, g] == tp
            assert np.isclose(curves.false_negative_rate()[i, g], 1 - tp / structure.sum())
            expected_fdr = (mask.sum() - tp) / mask.sum() if mask.sum() else 0.0
            assert np.isclose(curves.false_discovery_rate()[i, g], expected_fdr)
        segmentation = probabilities.argmax(0)
        s = (segmentation == label) & keep
        assert np.isclose(curves.dice[i], 2 * (s & structure).sum() / (s.sum() + structure.sum()))
    loaded = CaseCurves.load(curves.save(tmp_path / "c.npz"))
    assert loaded.case == "c" and loaded.labels == (1, 2) and loaded.voxel_ml == 0.5
    assert (loaded.counts == curves.counts).all() and (loaded.reference_counts == curves.reference_counts).all()


def test_absent_structure_has_nan_fnr():
    probabilities = np.stack([np.full((4, 4), 0.7), np.full((4, 4), 0.3)])
    curves = case_curves("c", probabilities, np.zeros((4, 4), int), [1], 1.0, grid=10)
    assert np.isnan(curves.false_negative_rate()).all()
    # p = 0.3: logit -0.85 lies in bin floor((-0.85 + 16) / 3.2) = 4 of 10
    assert curves.false_discovery_rate()[0, 4] == 1.0 and curves.false_discovery_rate()[0, 5] == 0.0
