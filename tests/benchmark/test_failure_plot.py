"""nnunet_mbls.benchmark.failure_plot: the risk-coverage plot."""

from __future__ import annotations

import pytest

from nnunet_mbls.benchmark.failure import risk_coverage
from nnunet_mbls.benchmark.failure_plot import plot_risk_coverage

from helpers.failure import synthetic_cases


def test_plot_risk_coverage_writes_a_png_atomically(tmp_path):
    dice, score = synthetic_cases(30, 0)
    risk = 1 - dice
    curves = {"entropy": risk_coverage(risk, score), "optimal": risk_coverage(risk, risk),
              "other trainer": risk_coverage(risk[:20], score[:20])}
    path = plot_risk_coverage(curves, tmp_path / "plots" / "risk_coverage.png", title="test")
    assert path == tmp_path / "plots" / "risk_coverage.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [p.name for p in path.parent.iterdir()] == ["risk_coverage.png"]  # no temporary file left
    with pytest.raises(ValueError, match=r"curves\['bad'\]\[1\] \(risk\)` has 3 values but `curves\['bad'\]\[0\] \(coverage\)` has 2"):
        plot_risk_coverage({"bad": ([0.5, 1.0], [0.1, 0.2, 0.3])}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_risk_coverage({}, tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()
