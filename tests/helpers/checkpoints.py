"""What a fold's calibration says about its checkpoints, checked against the files themselves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


def head_key(weights: dict) -> str:
    """The full-resolution segmentation head's weight (the highest ``decoder.seg_layers.{i}``)."""
    return max((k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[2]))


def assert_calibration_describes(fold: Path, checkpoint: str) -> dict:
    """calibration.json names ``checkpoint`` (its SHA-256 of today), the streamed statistics were computed by its
    weights, and the calibrated checkpoint is it with the head divided by T (every other weight equal)."""
    from nnunet_mbls.calibration.evaluation.export import weights_id
    from nnunet_mbls.calibration.evaluation.statistics import read_headers
    from nnunet_mbls.calibration.folds import calibration_problem

    record = json.loads((fold / "calibration.json").read_text())
    assert record["source_checkpoint"] == {"file": checkpoint, "sha256": sha256(fold / checkpoint)}
    weights = weights_of(fold / checkpoint)
    headers = read_headers(sorted((fold / "validation_statistics").glob("*.npz")))
    assert {h["model_id"] for h in headers} == {weights_id(weights)}
    assert record["calibrated_checkpoint"] == checkpoint.replace(".pth", "_calibrated.pth")
    calibrated = weights_of(fold / record["calibrated_checkpoint"])
    head, T = head_key(weights), record["temperature"]
    torch.testing.assert_close(calibrated[head] * T, weights[head], rtol=1e-5, atol=1e-7)
    assert all(torch.equal(calibrated[k], weights[k]) for k in weights if not k.startswith(head.rsplit(".", 1)[0]))
    assert calibration_problem(fold) is None
    return record
