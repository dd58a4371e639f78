"""nnunet_mbls.calibration.subsample: the bounded, uniform, reproducible voxel subsample temperatures are fitted on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mbls.calibration import VoxelSubsampler, fit_temperature

from helpers.probabilities import BOX_SHAPE, box_case, overconfident_data


def cases(n_cases: int, voxels: int, c: int = 3, k: float = 2.0):
    """``n_cases`` cases of probabilities (C, voxels) and labels (voxels,) with true temperature k."""
    for i in range(n_cases):
        logits, y = overconfident_data(k, voxels, c=c, seed=10 + i)
        yield torch.softmax(logits, dim=1).T.contiguous(), y


def test_subsampler_keeps_everything_under_the_cap_and_rows_stay_aligned():
    sub = VoxelSubsampler(max_voxels=10_000)
    all_p, all_y = [], []
    for p, y in cases(3, 1000):
        sub.add(p, y)
        all_p.append(p.T)
        all_y.append(y)
    log_p, y = sub.arrays()
    assert log_p.shape == (3000, 3) and sub.n_seen == 3000
    reference = {(tuple(r.tolist()), int(t)) for r, t in zip(torch.log(torch.cat(all_p)), torch.cat(all_y))}
    assert {(tuple(r.tolist()), int(t)) for r, t in zip(log_p, y)} == reference


def test_subsampler_is_bounded_uniform_masked_and_deterministic():
    small = (torch.full((2, 1000), 0.5), torch.zeros(1000, dtype=torch.long))
    large = (torch.full((2, 2000), 0.5), torch.ones(2000, dtype=torch.long))
    runs = []
    for seed in (0, 0, 1):
        sub = VoxelSubsampler(max_voxels=900, seed=seed)
        sub.chunk_voxels = 700
        sub.add(*small)
        sub.add(*large)
        runs.append(sub.arrays()[1].clone())
        assert len(sub) == 900 and sub.n_seen == 3000
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # uniform over all voxels: about a third from the small case (hypergeometric sd ~ 12)
    assert abs(int((runs[0] == 0).sum()) - 300) < 60
    masked = VoxelSubsampler(max_voxels=900)
    masked.add(small[0], small[1], torch.arange(1000) < 10)
    assert len(masked) == 10


def test_subsampler_rejects_bad_case_without_side_effects():
    first, second = cases(2, 100)
    sub, clean = VoxelSubsampler(max_voxels=50), VoxelSubsampler(max_voxels=50)
    sub.chunk_voxels = clean.chunk_voxels = 10  # the bad label sits in the last chunk
    sub.add(*first)
    clean.add(*first)
    before = [t.clone() for t in sub.arrays()]
    bad = first[1].clone()
    bad[-1] = 9
    with pytest.raises(ValueError, match=r"labels \[9\]"):
        sub.add(first[0], bad)
    assert sub.n_seen == 100 and all(torch.equal(a, b) for a, b in zip(sub.arrays(), before))
    sub.add(*second)  # the random stream was rolled back too: as if the bad case never came
    clean.add(*second)
    assert all(torch.equal(a, b) for a, b in zip(sub.arrays(), clean.arrays()))
    with pytest.raises(ValueError, match="no voxel"):
        VoxelSubsampler().arrays()


def test_subsample_then_fit_recovers_temperature():
    sub = VoxelSubsampler(max_voxels=60_000, seed=3)
    for p, y in cases(4, 30_000, k=2.0):
        sub.add(p.reshape(3, 100, 300), y.reshape(100, 300))
    assert fit_temperature(*sub.arrays()) == pytest.approx(2.0, rel=0.05)


def test_subsample_of_per_case_keys_does_not_depend_on_the_order_of_the_cases():
    from nnunet_mbls.calibration.subsample import VoxelSubsampler, case_candidates

    rng = np.random.default_rng(1)
    cases = {f"case_{i}": box_case(rng) for i in range(4)}
    candidates = {name: case_candidates(name, probs, labels.astype(np.int64), labels >= 0, max_voxels=1500, seed=7)
                  for name, (labels, probs) in cases.items()}
    samples = []
    for order in (["case_0", "case_1", "case_2", "case_3"], ["case_3", "case_1", "case_0", "case_2"]):
        sub = VoxelSubsampler(max_voxels=1500, seed=7)
        for name in order:
            sub.add_candidates(candidates[name])
        samples.append(sub.arrays())
        assert sub.n_seen == 4 * np.prod(BOX_SHAPE)
    assert torch.equal(samples[0][0], samples[1][0]) and torch.equal(samples[0][1], samples[1][1])
    assert samples[0][1].numel() == 1500
    # a case's keys depend on the seed and its name only
    again = case_candidates("case_0", cases["case_0"][1], cases["case_0"][0].astype(np.int64), None,
                            max_voxels=1500, seed=7)
    np.testing.assert_array_equal(again.keys, candidates["case_0"].keys)
    other_seed = case_candidates("case_0", cases["case_0"][1], cases["case_0"][0].astype(np.int64), None,
                                 max_voxels=1500, seed=8)
    assert not np.array_equal(other_seed.keys, candidates["case_0"].keys)
