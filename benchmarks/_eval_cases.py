"""A generated folder of nnU-Net-like cases for the evaluation benchmarks (no nnU-Net run needed).

``ROOT/ref/case_i.nii.gz``: labels 0..C-1 (uint8, spacing 1 x 1.5 x 2 mm): C-1 nested ellipsoids with a
smooth random boundary jitter; ``ROOT/pred/case_i.npz``: nnU-Net's ``probabilities`` (C, *shape) float32,
the softmax of smooth noisy logits around the labels (so the argmax is right except near boundaries and in
a few smooth blobs), written with ``np.savez_compressed`` as nnU-Net does; ``ROOT/dataset.json``.
No ``.pkl``: the crop box is the whole image. Deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int = 8) -> np.ndarray:
    """Smooth noise in [-1, 1]-ish: coarse normal noise upsampled (nearest, then a box blur)."""
    from scipy.ndimage import uniform_filter, zoom

    coarse = rng.normal(size=tuple(max(2, s // scale) for s in shape))
    fine = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)
    return uniform_filter(fine, size=3)[tuple(slice(0, s) for s in shape)]


def make_case(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (*shape) uint8, probabilities (C, *shape) float32)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid)) + 0.08 * _smooth_noise(rng, shape)
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(1, num_classes):  # nested shells: class k inside radius (num_classes - k) / num_classes * 0.9
        labels[radius < 0.9 * (num_classes - k) / num_classes] = k
    logits = rng.normal(scale=0.3, size=(num_classes,) + shape).astype(np.float32)
    onehot = np.eye(num_classes, dtype=np.float32)[labels].transpose(-1, *range(len(shape)))
    logits += 4.0 * onehot + 2.5 * _smooth_noise(rng, (num_classes,) + shape).astype(np.float32)
    logits -= logits.max(0)
    probs = np.exp(logits)
    probs /= probs.sum(0)
    return labels, probs.astype(np.float32)


def make_eval_folder(root: str | Path, n_cases: int, shape: tuple[int, ...], num_classes: int = 4,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write ROOT/ref, ROOT/pred and ROOT/dataset.json; returns (ref folder, pred folder)."""
    import SimpleITK as sitk

    root = Path(root)
    ref, pred = root / "ref", root / "pred"
    ref.mkdir(parents=True, exist_ok=True)
    pred.mkdir(exist_ok=True)
    names = {"background": 0, **{f"structure_{k}": k for k in range(1, num_classes)}}
    (root / "dataset.json").write_text(json.dumps({"labels": names, "channel_names": {"0": "x"},
                                                   "file_ending": ".nii.gz", "numTraining": n_cases}))
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        labels, probs = make_case(rng, tuple(shape), num_classes)
        image = sitk.GetImageFromArray(labels)
        image.SetSpacing(tuple(float(s) for s in (1.0, 1.5, 2.0)[: len(shape)]))
        sitk.WriteImage(image, str(ref / f"case_{i}.nii.gz"))
        with open(pred / f"case_{i}.npz", "wb") as f:
            np.savez_compressed(f, probabilities=probs)
    return ref, pred
