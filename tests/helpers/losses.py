"""Naive references for the losses (numpy, float64, explicit loops over voxels) and their inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


IGNORE = 3  # with C = 3 classes, nnU-Net's ignore label equals the number of classes


# ---------------------------------------------------------------- naive references (numpy, float64, loops)
def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def voxels(shape):
    return itertools.product(*[range(s) for s in shape])


def neighbourhood(idx, shape, radius):
    """All offsets of the (2r+1)^d box around idx: (neighbour index or None if outside, offset)."""
    for off in itertools.product(range(-radius, radius + 1), repeat=len(shape)):
        n = tuple(i + o for i, o in zip(idx, off))
        inside = all(0 <= x < s for x, s in zip(n, shape))
        yield (n if inside else None), off


def naive_loss(name, logits, target, ignore, **hp):
    """Loss of a (B, C, *sp) float64 array and (B, *sp) int array, voxel by voxel."""
    B, C = logits.shape[:2]
    sp = logits.shape[2:]
    total, count = 0.0, 0
    for b in range(B):
        for idx in voxels(sp):
            y = target[(b,) + idx]
            if ignore is not None and y == ignore:
                continue
            l = np.array([logits[(b, k) + idx] for k in range(C)])
            p = softmax(l)
            logp = np.log(p)
            ce = -logp[y]
            if name == "ce":
                v = ce
            elif name == "mbls":
                v = ce + hp["lam"] * sum(max(0.0, l.max() - l[k] - hp["margin"]) for k in range(C)) / C
            elif name == "focal":
                v = -((1 - p[y]) ** hp["gamma"]) * logp[y]
            elif name == "ls":
                v = (1 - hp["alpha"]) * ce + hp["alpha"] * np.mean(-logp)
            elif name == "ecp":
                v = ce - hp["alpha"] * np.mean(-p * logp)
            elif name == "svls":
                # Gaussian weights, centre = sum of neighbours, replicate padding, ignored neighbours dropped
                w = lambda off: 0.0 if not any(off) else math.exp(-sum(o * o for o in off) / (2 * hp["sigma"] ** 2))
                centre = sum(w(off) for off in itertools.product((-1, 0, 1), repeat=len(sp)))
                soft, norm = np.zeros(C), 0.0
                for _, off in neighbourhood(idx, sp, 1):
                    n = tuple(min(max(i + o, 0), s - 1) for i, o, s in zip(idx, off, sp))
                    yn = target[(b,) + n]
                    if ignore is not None and yn == ignore:
                        continue
                    weight = centre if not any(off) else w(off)
                    soft[yn] += weight
                    norm += weight
                v = -(soft / norm * logp).sum()
            elif name == "nacl":
                k = hp["kernel_size"]
                smooth = np.zeros(C)
                for n, _ in neighbourhood(idx, sp, k // 2):
                    if n is None:
                        continue  # zero padding
                    yn = target[(b,) + n]
                    if ignore is not None and yn == ignore:
                        continue
                    smooth[yn] += 1.0 / k ** len(sp)
                v = ce + hp["alpha"] * np.mean(np.abs(smooth - l))
            else:
                raise KeyError(name)
            total += v
            count += 1
    return total / max(count, 1)


DEFAULTS = {
    "ce": {},
    "mbls": {"margin": 1.0, "lam": 0.3},  # small margin so the penalty is active on random logits
    "focal": {"gamma": 3.0},
    "ls": {"alpha": 0.1},
    "ecp": {"alpha": 0.1},
    "svls": {"sigma": 1.0},
    "nacl": {"alpha": 0.1, "kernel_size": 3},
}


def make_inputs(spatial, with_ignore, seed=0, C=3, B=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, C) + spatial, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, C, (B, 1) + spatial, generator=g)
    if with_ignore:
        target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
    return logits, target
