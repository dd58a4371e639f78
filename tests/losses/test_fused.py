"""nnunet_mbls.losses.fused: gradients of every loss against autograd through plain, unfused torch formulas
(float64 references), and chunked evaluation giving the one-chunk value and gradient.

The losses may use hand-written or chunked gradients for speed; these references are the textbook
formulas written with ordinary autograd-tracked torch ops.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from nnunet_mbls.losses import LOSSES, build_loss, svls_kernel

from helpers.losses import DEFAULTS, IGNORE, make_inputs


def plain_reference(name: str, logits: torch.Tensor, target: torch.Tensor, ignore: int | None, **hp) -> torch.Tensor:
    """Loss with plain autograd ops; logits (B, C, *sp) float64, target (B, *sp)."""
    C = logits.shape[1]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore is None else target != ignore
    t = torch.where(valid, target, 0)
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    onehot = F.one_hot(t, C).movedim(-1, 1).to(logits.dtype) * valid[:, None]
    ce = -(onehot * log_p).sum(1)
    if name == "ce":
        v = ce
    elif name == "mbls":
        gap = logits.max(1, keepdim=True).values - logits
        v = ce + hp["lam"] * F.relu(gap - hp["margin"]).mean(1)
    elif name == "mbls_dice":
        raise AssertionError("compared separately")
    elif name == "focal":
        pt = (p * onehot).sum(1)
        v = -((1 - pt) ** hp["gamma"]) * torch.log(pt.clamp_min(1e-300))
    elif name == "ls":
        v = (1 - hp["alpha"]) * ce + hp["alpha"] * (-log_p).mean(1)
    elif name == "ecp":
        v = ce - hp["alpha"] * (-p * log_p).mean(1)
    elif name in ("svls", "nacl"):
        d = logits.ndim - 2
        conv = F.conv2d if d == 2 else F.conv3d
        if name == "svls":
            k = svls_kernel(hp["sigma"], d).to(logits.dtype)
            w = k.expand((C, 1) + k.shape)
            pad = lambda x: F.pad(x, (1,) * (2 * d), mode="replicate")
            soft = conv(pad(onehot), w, groups=C) / conv(pad(valid[:, None].to(logits.dtype)), w[:1])
            v = -(soft * log_p).sum(1)
        else:
            ks = hp["kernel_size"]
            w = torch.full((C, 1) + (ks,) * d, 1.0 / ks**d, dtype=logits.dtype)
            smooth = conv(onehot, w, padding=ks // 2, groups=C)
            v = ce + hp["alpha"] * (smooth - logits).abs().mean(1)
    else:
        raise KeyError(name)
    return (v * valid).sum() / valid.sum()


PARAMS = {
    "ce": {},
    "mbls": {"margin": 1.0, "lam": 0.3},
    "focal": {"gamma": 3.0},
    "ls": {"alpha": 0.1},
    "ecp": {"alpha": 0.1},
    "svls": {"sigma": 1.0},
    "nacl": {"alpha": 0.1, "kernel_size": 3},
}


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("spatial", [(7, 6), (5, 4, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("ignore", [None, IGNORE], ids=["no_ignore", "ignore"])
def test_gradient_equals_autograd_of_the_plain_formula(name, spatial, ignore):
    g = torch.Generator().manual_seed(len(name) + len(spatial))
    logits = torch.randn((2, 3) + spatial, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 3, (2,) + spatial, generator=g)
    if ignore is not None:
        target[torch.rand(target.shape, generator=g) < 0.25] = IGNORE
    ref_x = logits.clone().requires_grad_()
    plain_reference(name, ref_x, target, ignore, **PARAMS[name]).backward()
    x = logits.float().requires_grad_()
    loss = build_loss(name, ignore_label=ignore, **PARAMS[name])(x, target[:, None])
    (loss * 1.7).backward()  # a non-unit upstream gradient must be propagated too
    torch.testing.assert_close(x.grad.double(), 1.7 * ref_x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mbls", "ce", "focal", "ecp"])
def test_gradcheck_float64(name):
    """torch.autograd.gradcheck on tiny inputs (finite differences, independent of any formula)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 3, 3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 3, (1, 1, 3, 4), generator=g)
    loss = build_loss(name, **PARAMS[name])
    # losses compute in float32 by design; compare finite differences at float32-appropriate tolerances
    analytic = torch.autograd.grad(loss(logits, target), logits)[0]
    eps = 1e-3
    numeric = torch.zeros_like(logits)
    for idx in itertools.product(*[range(s) for s in logits.shape]):
        plus, minus = logits.detach().clone(), logits.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (loss(plus, target) - loss(minus, target)).double() / (2 * eps)
    torch.testing.assert_close(analytic.double(), numeric, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_evaluation_gives_the_same_value_and_gradient(name, monkeypatch):
    from nnunet_mbls.losses import fused

    logits, target = make_inputs((5, 6, 7), with_ignore=True, seed=9)
    loss = build_loss(name, ignore_label=IGNORE, **DEFAULTS.get(name, {}))
    results = []
    for chunk in (fused.CHUNK_ELEMENTS, 7):  # one chunk, then many uneven ones (and several slabs)
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
        x = logits.float().requires_grad_()
        value = loss(x, target)
        value.backward()
        results.append((value.detach(), x.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)
