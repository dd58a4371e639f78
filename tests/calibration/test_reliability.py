"""nnunet_mbls.calibration.reliability: the reliability diagram."""

from __future__ import annotations

import pytest

from nnunet_mbls.calibration import CalibrationAccumulator, plot_reliability

from helpers.probabilities import random_case


def test_plot_reliability_writes_png(tmp_path):
    probs, target = random_case(3, (30, 30), seed=16)
    acc = CalibrationAccumulator(3)
    acc.update(probs, target)
    curve = {**acc.reliability(), "ece": acc.compute()["ece"]}
    for curves in ({"raw": curve}, {"raw": curve, "other": acc.reliability()}):
        out = plot_reliability(curves, tmp_path / "rel.png", title="test")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="count"):
        plot_reliability({"bad": {"bin_lower": [0.0]}}, tmp_path / "bad.png")
