"""Reliability diagrams (accuracy against confidence per bin) written as PNG files."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunet_mbls.io import atomic_write
from nnunet_mbls.plotting import default_style

CURVE_KEYS = ("bin_lower", "bin_upper", "confidence", "accuracy", "count")


def plot_reliability(
    curves: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike, title: str = "Reliability diagram"
) -> Path:
    """Draw one or several reliability diagrams to a PNG at ``path`` (written atomically).

    Args:
        curves: name -> curve as returned by ``CalibrationAccumulator.reliability()`` (arrays of shape
            (n_bins,) under ``bin_lower``, ``bin_upper``, ``confidence``, ``accuracy``, ``count``), optionally
            with a scalar ``ece`` shown in the legend.
        path: output .png file.
        title: figure title.

    Top panel: per-bin accuracy against mean confidence with the diagonal of perfect calibration; a
    single curve is drawn as bars over its bins, several as lines with markers. Bottom panel: voxels per
    bin on a log scale (linear when no curve has a voxel). Uses the Agg canvas directly (no pyplot state,
    safe in worker processes).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``curves`` is empty, or a curve lacks one of ``bin_lower``, ``bin_upper``, ``confidence``,
            ``accuracy``, ``count``.
        OSError: the PNG cannot be written (``path`` is left untouched).
    """
    if not curves:
        raise ValueError("curves is empty; pass {name: accumulator.reliability()}")
    for name, curve in curves.items():
        missing = [k for k in CURVE_KEYS if k not in curve]
        if missing:
            raise ValueError(f"curve {name!r} lacks {missing}; pass CalibrationAccumulator.reliability() output")

    with default_style():
        fig = Figure(figsize=(6.0, 7.5), dpi=100)
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
        single = len(curves) == 1
        for name, curve in curves.items():
            lower, upper = np.asarray(curve["bin_lower"], float), np.asarray(curve["bin_upper"], float)
            conf, acc = np.asarray(curve["confidence"], float), np.asarray(curve["accuracy"], float)
            count = np.asarray(curve["count"], float)
            label = name if "ece" not in curve else f"{name} (ECE {float(curve['ece']):.4f})"
            filled = count > 0
            if single:
                bars = top.bar(lower[filled], acc[filled], width=(upper - lower)[filled], align="edge",
                               edgecolor="black", alpha=0.7, label=f"{label}: accuracy")
                top.bar(lower[filled], conf[filled] - acc[filled], bottom=acc[filled], width=(upper - lower)[filled],
                        align="edge", color="red", alpha=0.25, hatch="//", label="gap to confidence")
                color = bars.patches[0].get_facecolor() if bars.patches else None
            else:
                (line,) = top.plot(conf[filled], acc[filled], marker="o", label=label)
                color = line.get_color()
            bottom.stairs(np.where(filled, count, np.nan), np.append(lower, upper[-1]), baseline=None,
                          color=color, linewidth=1.5, label=name)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
        top.set_title(textwrap.fill(title, 55), fontsize=11)  # long dataset names would run off the figure
        top.set_aspect("auto")
        top.grid(True, alpha=0.3)
        top.legend(loc="upper left", fontsize=8)
        # a log axis without any positive value cannot be drawn (e.g. no foreground voxel in any case)
        any_voxels = any(np.asarray(c["count"], float).sum() > 0 for c in curves.values())
        bottom.set(yscale="log" if any_voxels else "linear", xlabel="confidence", ylabel="voxels per bin")
        bottom.grid(True, alpha=0.3)
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
