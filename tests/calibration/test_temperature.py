"""Temperature fit, subsampling, application to probabilities and folding into a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_mbls.calibration import (
    VoxelSubsampler,
    apply_temperature,
    fit_temperature,
    fold_temperature_into_checkpoint,
)


def overconfident_data(k: float, n: int, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits k * z (N, C) with labels drawn from softmax(z): the true temperature is k."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    return k * z, y


def nll(logits: torch.Tensor, y: torch.Tensor, T: float) -> float:
    return float(nn.functional.cross_entropy(logits.double() / T, y))


@pytest.mark.parametrize("k", [2.5, 0.6])
def test_fit_recovers_known_temperature(k):
    logits, y = overconfident_data(k, 200_000)
    T = fit_temperature(torch.log_softmax(logits, dim=1), y)
    assert T == pytest.approx(k, rel=0.05)
    # it is the minimiser of the NLL, checked with torch's cross entropy
    assert nll(logits, y, T) < min(nll(logits, y, T * 1.01), nll(logits, y, T / 1.01))


def test_fit_same_from_logits_log_probs_and_numpy():
    logits, y = overconfident_data(1.7, 20_000, c=3, seed=1)
    reference = fit_temperature(logits, y)
    assert fit_temperature(torch.log(torch.softmax(logits, 1)), y) == pytest.approx(reference, rel=1e-5)
    assert fit_temperature(torch.log_softmax(logits, 1).numpy(), y.numpy()) == pytest.approx(reference, rel=1e-5)


def test_fit_degenerate_inputs_return_finite_bounds():
    log_p = torch.log(torch.tensor([[0.9, 0.05, 0.05]])).repeat(500, 1)
    all_correct = torch.zeros(500, dtype=torch.long)
    assert fit_temperature(log_p, all_correct) == 0.05  # NLL keeps falling as T shrinks: lower bound
    assert fit_temperature(log_p, all_correct, t_bounds=(0.2, 5.0)) == 0.2
    saturated = torch.log(torch.tensor([[1.0, 0.0]])).repeat(10, 1)  # -inf entries, p_target = 1
    assert fit_temperature(saturated, torch.zeros(10, dtype=torch.long)) == 0.05
    one_class = torch.zeros(100, 1)
    assert fit_temperature(one_class, torch.zeros(100, dtype=torch.long)) == 1.0  # flat NLL: keep T = 1
    all_wrong = torch.log(torch.tensor([[0.98, 0.02]])).repeat(10, 1)
    T = fit_temperature(all_wrong, torch.ones(10, dtype=torch.long))
    assert math.isfinite(T) and T == 20.0  # wants uniform probabilities: upper bound


def test_fit_rejects_bad_input():
    logits, y = overconfident_data(1.0, 10, c=2)
    with pytest.raises(ValueError, match="t_bounds"):
        fit_temperature(logits, y, t_bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((10, 2), float("nan")), y)
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        fit_temperature(logits, torch.full((10,), 5))
    with pytest.raises(ValueError, match=r"shape \(9,\)"):
        fit_temperature(logits, y[:9])


def test_apply_temperature_equals_softmax_of_scaled_log_probs():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(3, 6, 7, 5, generator=g) * 3, dim=0)
    probs[:, 0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # like nnU-Net outside the crop box
    for T in (0.5, 2.0):
        out = apply_temperature(probs, T)
        expected = torch.softmax(torch.log(probs.double()) / T, dim=0).float()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(out.argmax(0), probs.argmax(0))
        assert torch.equal(out[:, 0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # p = 0 stays 0
    as_numpy = apply_temperature(probs.numpy(), 2.0)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_allclose(as_numpy, apply_temperature(probs, 2.0).numpy(), rtol=1e-6)
    torch.testing.assert_close(apply_temperature(probs, 1.0), probs)
    assert apply_temperature(probs.double(), 3.0).dtype == torch.float64
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="T must be a finite number > 0"):
            apply_temperature(probs, bad)


def test_apply_temperature_matches_scaled_logits():
    """normalize(p ** (1/T)) == softmax(z / T), the identity folding relies on."""
    logits, _ = overconfident_data(1.0, 1000, c=5, seed=3)
    probs = torch.softmax(logits.double(), dim=1).T  # (C, N)
    torch.testing.assert_close(apply_temperature(probs, 1.8), torch.softmax(logits.double() / 1.8, dim=1).T)


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


# ---- folding into a checkpoint ----------------------------------------------------------------------
class TinyUNet(nn.Module):
    """Stand-in with nnU-Net's key layout: encoder stem, decoder.seg_layers (one head per scale)."""

    def __init__(self, n_heads: int = 11) -> None:
        super().__init__()
        self.encoder = nn.Conv3d(1, 4, 3, padding=1)
        self.decoder = nn.Module()
        self.decoder.seg_layers = nn.ModuleList([nn.Conv3d(4, 3, 1) for _ in range(n_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.seg_layers[-1](torch.relu(self.encoder(x)))


def save_checkpoint(path, net: nn.Module) -> None:
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 3}, path)


def test_fold_divides_last_head_only_and_leaves_source_untouched(tmp_path):
    torch.manual_seed(0)
    net = TinyUNet()  # 11 heads: a lexicographic "highest index" would pick seg_layers.9
    src, dst = tmp_path / "checkpoint_final.pth", tmp_path / "checkpoint_final_calibrated.pth"
    save_checkpoint(src, net)
    src_bytes = src.read_bytes()
    modified = fold_temperature_into_checkpoint(src, dst, 2.5)
    assert modified == ["decoder.seg_layers.10.weight", "decoder.seg_layers.10.bias"]
    assert src.read_bytes() == src_bytes
    folded = torch.load(dst, map_location="cpu", weights_only=False)
    assert folded["mbls_temperature"] == 2.5 and folded["current_epoch"] == 3
    assert list(folded["network_weights"]) == list(net.state_dict())
    calibrated = TinyUNet()
    calibrated.load_state_dict(folded["network_weights"], strict=True)
    x = torch.randn(1, 1, 4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(x), net(x) / 2.5)
        for key, value in net.state_dict().items():
            if key not in modified:
                assert torch.equal(folded["network_weights"][key], value), key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])


def test_fold_refuses_bad_targets_and_architectures(tmp_path):
    src = tmp_path / "model.pth"
    save_checkpoint(src, TinyUNet(n_heads=2))
    with pytest.raises(ValueError, match="source checkpoint"):
        fold_temperature_into_checkpoint(src, tmp_path / "." / "model.pth", 2.0)
    dst = tmp_path / "calibrated.pth"
    fold_temperature_into_checkpoint(src, dst, 2.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fold_temperature_into_checkpoint(src, dst, 3.0)
    fold_temperature_into_checkpoint(dst, tmp_path / "twice.pth", 1.5)
    assert torch.load(tmp_path / "twice.pth", weights_only=False)["mbls_temperature"] == pytest.approx(3.0)
    plain = tmp_path / "plain.pth"
    torch.save({"network_weights": nn.Conv3d(2, 2, 1).state_dict()}, plain)
    with pytest.raises(ValueError, match=r"decoder\.seg_layers\.\{i\}\.weight.*apply_temperature"):
        fold_temperature_into_checkpoint(plain, tmp_path / "out.pth", 2.0)
    with pytest.raises(ValueError, match="T must be"):
        fold_temperature_into_checkpoint(src, tmp_path / "out.pth", 0.0)
    assert not (tmp_path / "out.pth").exists()
