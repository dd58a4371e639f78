"""Synthetic cases for failure detection: Dice and an uncertainty loosely related to it."""

from __future__ import annotations

import numpy as np


def synthetic_cases(n: int, seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Dice in [0, 1] and an uncertainty loosely related to 1 - Dice."""
    rng = np.random.default_rng(seed)
    dice = np.clip(rng.beta(6, 1.5, size=n), 0, 1)
    score = (1 - dice) + rng.normal(0, noise, size=n)
    return dice, score
