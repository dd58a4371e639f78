"""The risk-coverage plot of the failure-detection statistics (:mod:`nnunet_mbls.benchmark.failure`)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_write
from ..plotting import default_style
from .failure_inputs import _as_cases, _same_length


def plot_risk_coverage(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                       title: str) -> Path:
    """Risk-coverage curves of several trainers/scores overlaid in one PNG at ``path`` (atomic write).

    Args:
        curves: label -> ``(coverage, selective_risk)`` as returned by
            :func:`~nnunet_mbls.benchmark.failure.risk_coverage` (two arrays of one length per label; lengths
            may differ between labels).
        path: the PNG to write.
        title: the plot's title (wrapped at 60 characters).

    Returns:
        ``path``.

    Raises:
        ValueError: ``curves`` is empty or not a dict, an entry is not a pair of finite 1-D arrays of one length.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"`curves` must be a non-empty dict label -> (coverage, risk); got {curves!r:.80}")
    checked = {}
    for label, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"`curves[{label!r}]` must be a pair (coverage, risk), e.g. risk_coverage(risk, score)")
        coverage = _as_cases(pair[0], f"curves[{label!r}][0] (coverage)")
        selective = _as_cases(pair[1], f"curves[{label!r}][1] (risk)")
        _same_length(**{f"curves[{label!r}][0] (coverage)": coverage, f"curves[{label!r}][1] (risk)": selective})
        checked[str(label)] = (coverage, selective)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with default_style():
        fig = Figure(figsize=(6.5, 5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for label, (coverage, selective) in checked.items():
            ax.plot(coverage, selective, label=label, marker="." if coverage.size <= 50 else None)
        ax.set(xlabel="coverage (fraction of cases accepted, most confident first)",
               ylabel="selective risk (mean 1 − Dice of accepted cases)", xlim=(0, 1.02))
        ax.set_title(textwrap.fill(title, 60), fontsize=11)  # dataset names make long titles
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
