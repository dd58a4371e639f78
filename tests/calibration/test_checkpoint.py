"""nnunet_mbls.calibration.checkpoint: folding a temperature or a per-class map (vector scaling) into the last head
of a checkpoint, leaving the source untouched, and keeping both checkpoints whole on a full disk."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

from nnunet_mbls.calibration import fold_temperature_into_checkpoint
from nnunet_mbls.calibration.checkpoint import fold_logit_affine_into_checkpoint

from helpers.disk import enospc
from helpers.folders import fake_checkpoint


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


class Head(nn.Module):
    """The two last decoder layers of an nnU-Net: a 3x3 convolution, then the linear 1x1 head."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.seg_layers = nn.ModuleList([nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)])
        self.body = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return self.decoder.seg_layers[1](torch.relu(self.body(x)))


def test_folding_a_per_class_map_gives_scale_times_logits_plus_bias(tmp_path):
    torch.manual_seed(0)
    net = Head()
    src, dst = tmp_path / "checkpoint_final.pth", tmp_path / "checkpoint_final_calibrated.pth"
    torch.save({"network_weights": net.state_dict(), "optimizer_state": {"x": 1}}, src)
    scale, bias = torch.tensor([0.5, 2.0, 1.25]), torch.tensor([0.0, -1.0, 0.75])
    modified = fold_logit_affine_into_checkpoint(src, dst, scale, bias)
    assert modified == ["decoder.seg_layers.1.weight", "decoder.seg_layers.1.bias"]
    folded = torch.load(dst, weights_only=False)
    assert "optimizer_state" not in folded and folded["mbls_logit_affine"]["bias"] == pytest.approx(bias.tolist())
    calibrated = Head()
    calibrated.load_state_dict(folded["network_weights"])
    x = torch.randn(2, 2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(x), net(x) * scale[:, None, None] + bias[:, None, None])
    with pytest.raises(ValueError, match="scale must be > 0"):
        fold_logit_affine_into_checkpoint(src, tmp_path / "bad.pth", [1.0, -1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="3 finite values"):
        fold_logit_affine_into_checkpoint(src, tmp_path / "bad.pth", [1.0, 1.0], 0.0)


def test_folding_into_a_checkpoint_on_a_full_disk_keeps_both_checkpoints_intact(tmp_path, monkeypatch):
    from nnunet_mbls.calibration.checkpoint import fold_temperature_into_checkpoint

    src, dst = tmp_path / "checkpoint_final.pth", tmp_path / "checkpoint_final_calibrated.pth"
    fake_checkpoint(src, num_classes=3, channels=4)
    fold_temperature_into_checkpoint(src, dst, 1.5)
    src_bytes, dst_bytes = src.read_bytes(), dst.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        enospc()

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError) as info:
        fold_temperature_into_checkpoint(src, dst, 2.0, overwrite=True)
    assert info.value.errno == errno.ENOSPC and "checkpoint_final_calibrated.pth" in str(info.value)
    assert src.read_bytes() == src_bytes and dst.read_bytes() == dst_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pth", "checkpoint_final_calibrated.pth"]
