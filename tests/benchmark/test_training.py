"""nnunet_mbls.benchmark.training: an interrupted benchmark fold continues from its latest checkpoint (real
nnU-Net training, CPU)."""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.integration  # every test trains/plans with nnU-Net or runs the demo


def test_interrupted_benchmark_training_continues_from_the_latest_checkpoint(nnunet_3d, tmp_path):
    """A fold with only checkpoint_latest.pth (an interrupted run) continues instead of restarting."""
    nn, dataset = nnunet_3d
    trainer = "nnUNetTrainerCE_test"
    nn.train(501, "3d_fullres", trainer, "2")
    fold = nn.fold_folder(dataset, trainer, "3d_fullres", 2)
    # make it look interrupted after epoch 0 of 2: only a latest checkpoint, saved at epoch 0
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["current_epoch"] = 1  # nnU-Net stores the next epoch to run
    checkpoint["logging"] = {key: values[:1] for key, values in checkpoint["logging"].items()}
    torch.save(checkpoint, fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    (fold / "calibration.json").unlink()
    logs_before = set(fold.glob("training_log_*.txt"))
    nn.run("nnunet-mbls", "benchmark", "-d", "501", "-c", "3d_fullres", "-f", "2", "-tr", trainer, "--baseline", trainer,
           "--train", "-device", "cpu", "-o", str(tmp_path / "bench"), training=True)
    new_log = "".join(p.read_text() for p in set(fold.glob("training_log_*.txt")) - logs_before)
    assert re.search(r": Epoch 1\s*$", new_log, re.M) and not re.search(r": Epoch 0\s*$", new_log, re.M)
    assert "nnunet-mbls loss: CELoss (ce)" in new_log
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "calibration.json").is_file()
