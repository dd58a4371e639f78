"""Synthetic probabilities and labels: softmax over the class axis, hand-made cases, cases of nested boxes,
over-confident logits with a known temperature, and random cases clear of the calibration bins' edges."""

from __future__ import annotations

import numpy as np
import torch

#: spatial shape of the hand-made cases
SHAPE = (4, 6, 5)


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the class axis (0), in float32."""
    e = np.exp(z - z.max(0))
    return (e / e.sum(0)).astype(np.float32)


def sample_cases(n: int, seed: int = 0, shape=SHAPE) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` hand-made cases: labels 0..2 and probabilities peaked at them (a softmax of noisy logits)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = rng.integers(0, 3, shape)
        logits = rng.normal(size=(3,) + shape) + 2.5 * np.eye(3)[labels].transpose(3, 0, 1, 2)
        out.append((labels, softmax(logits)))
    return out


#: spatial shape and classes of the cases of nested boxes (the worker-process tests)
BOX_SHAPE = (10, 14, 12)
BOX_CLASSES = 4


def box_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3D labels 0..3 (nested boxes with noise) and over-confident probabilities around them."""
    labels = np.zeros(BOX_SHAPE, dtype=np.uint8)
    for k in range(1, BOX_CLASSES):
        lo = [k + int(rng.integers(0, 2)) for _ in BOX_SHAPE]
        labels[tuple(slice(a, s - a) for a, s in zip(lo, BOX_SHAPE))] = k
    z = rng.normal(size=(BOX_CLASSES,) + BOX_SHAPE) + 3.0 * np.eye(BOX_CLASSES)[labels].transpose(3, 0, 1, 2)
    e = np.exp(2 * (z - z.max(0)))
    return labels, (e / e.sum(0)).astype(np.float32)


def overconfident_data(k: float, n: int, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits k * z (N, C) with labels drawn from softmax(z): the true temperature is k."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    return k * z, y


#: bins of the calibration metrics
N_BINS = 15


def random_case(c: int, shape: tuple[int, ...], seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (C, *shape) float32 and labels (*shape) sampled from a sharper softmax,
    with voxels whose probabilities lie within 1e-3 of an inner bin edge relabelled to a fresh draw
    (so the (lower, upper] and [lower, upper) conventions agree on every voxel)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((c, *shape), generator=g) * scale
    probs = torch.softmax(z, dim=0)
    scaled = probs.double() * N_BINS
    near_edge = ((scaled - scaled.round()).abs() < 1e-3) & (scaled.round() >= 1) & (scaled.round() <= N_BINS - 1)
    probs[:, near_edge.any(dim=0)] = torch.softmax(torch.tensor([0.31, 0.0] + [-1.0] * (c - 2)), 0)[:, None]
    flat = torch.softmax(1.5 * z, dim=0).reshape(c, -1).T
    target = torch.multinomial(flat, 1, generator=g).reshape(shape)
    return probs, target
