"""Generated cases with known truth for conformal tests: discs and an over-confident model that under-segments."""

from __future__ import annotations

import numpy as np

from nnunet_mbls.calibration.conformal.curves import CaseCurves, case_curves


def overconfident_case(rng: np.random.Generator, size: int = 32, sharpness: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """One 2-class case: a disc of random centre and radius (the reference) and probabilities of a model whose
    disc is 60-100% of the true radius with a sharp edge (argmax FNR about 0.3: over-confident).

    Returns:
        (2, size, size) float32 probabilities and (size, size) int64 reference labels.
    """
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    radius = rng.uniform(size * 0.15, size * 0.3)
    distance = np.hypot(yy - cy, xx - cx)
    reference = (distance <= radius).astype(np.int64)
    predicted_radius = radius * rng.uniform(0.6, 1.0)
    p1 = 1.0 / (1.0 + np.exp(-sharpness * (predicted_radius - distance)))
    return np.stack([1 - p1, p1]).astype(np.float32), reference


def overconfident_curves(num_cases: int, seed: int = 0) -> list[CaseCurves]:
    """:class:`CaseCurves` of ``num_cases`` generated cases (voxel volume 1 ml)."""
    rng = np.random.default_rng(seed)
    curves = []
    for i in range(num_cases):
        probabilities, reference = overconfident_case(rng)
        curves.append(case_curves(f"case_{i:03d}", probabilities, reference, [1], 1.0))
    return curves
