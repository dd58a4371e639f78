"""nnunet_mbls.losses.regions: the sigmoid forms of the losses against hand-written formulas, the softmax MbLS
penalty on the two-class logits (z, 0), and nnU-Net's own region loss."""

from __future__ import annotations

import pytest
import torch

from nnunet_mbls.losses import build_region_loss, margin_penalty_map
from nnunet_mbls.losses.regions import (RegionBCELoss, RegionFocalLoss, RegionLabelSmoothingLoss, RegionMbLSDiceLoss,
                                        RegionMbLSLoss)


def region_inputs(seed: int, regions: int = 3, shape=(5, 6, 4), ignore: bool = False):
    """Logits (2, R, *shape) float64 spread over ±25 and nnU-Net's region target (plus its ignore channel)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, regions, *shape, generator=g, dtype=torch.float64) * 12
    y = (torch.rand(2, regions, *shape, generator=g) < 0.4).double()
    if not ignore:
        return z, y
    ignored = (torch.rand(2, 1, *shape, generator=g) < 0.3).double()
    return z, torch.cat([y, ignored], 1)


def naive_bce(z, t):
    """−[t log σ(z) + (1 − t) log(1 − σ(z))], float64, with log σ written through log1p(exp) for large |z|."""
    log_p, log_q = -torch.log1p(torch.exp(-z)), -torch.log1p(torch.exp(z))
    return -(t * log_p + (1 - t) * log_q)


def test_bce_and_label_smoothing_equal_the_formula():
    z, y = region_inputs(0)
    assert RegionBCELoss()(z, y).item() == pytest.approx(naive_bce(z, y).mean().item(), rel=1e-6)
    alpha = 0.2
    smoothed = y * (1 - alpha) + alpha / 2
    assert RegionLabelSmoothingLoss(alpha)(z, y).item() == pytest.approx(naive_bce(z, smoothed).mean().item(), rel=1e-6)


def test_mbls_penalty_is_the_softmax_penalty_of_the_two_class_logits():
    z, y = region_inputs(1)
    margin, lam = 10.0, 0.1
    # the softmax MbLS penalty Σ_k relu(max_j l_j − l_k − m) of each region's two-class logits (z_r, 0)
    pairs = torch.stack([z, torch.zeros_like(z)], 2).flatten(0, 1)  # (B·R, 2, *spatial)
    penalty = margin_penalty_map(pairs, margin).reshape(z.shape)
    expected = naive_bce(z, y).mean() + lam * penalty.mean()
    assert RegionMbLSLoss(margin, lam)(z, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert (penalty > 0).any() and (penalty == 0).any()  # both sides of the margin are exercised


def test_focal_equals_the_formula_and_bce_at_gamma_0():
    z, y = region_inputs(2)
    p = torch.sigmoid(z)
    p_true = torch.where(y == 1, p, 1 - p)
    expected = -((1 - p_true) ** 3 * torch.log(p_true.clamp_min(1e-300)))
    assert RegionFocalLoss(3.0)(z, y).item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert RegionFocalLoss(0.0)(z, y).item() == pytest.approx(RegionBCELoss()(z, y).item(), rel=1e-9)


@pytest.mark.parametrize("loss", [RegionBCELoss(ignore_label=4), RegionMbLSLoss(2.0, 0.5, ignore_label=4),
                                  RegionFocalLoss(2.0, ignore_label=4), RegionLabelSmoothingLoss(0.1, ignore_label=4)])
def test_ignored_voxels_do_not_count(loss):
    z, target = region_inputs(3, ignore=True)
    scored = target[:, -1] == 0  # (B, *spatial)
    per_region = [type(loss)(**loss.hyper_parameters)(z[:, r][scored][None, None], target[:, r][scored][None, None])
                  for r in range(z.shape[1])]
    assert loss(z, target).item() == pytest.approx(torch.stack(per_region).mean().item(), rel=1e-6)


def test_mbls_dice_is_nnunet_region_loss_plus_the_penalty():
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    z, target = region_inputs(4, ignore=True)
    z = z.float()
    nnunet = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                             use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)(z, target.float())
    scored = (target[:, -1:] == 0).expand_as(z)
    penalty = torch.relu(z.abs() - 10.0)[scored].mean()
    loss = RegionMbLSDiceLoss(10.0, 0.1, ignore_label=4, batch_dice=True)(z, target.float())
    assert loss.item() == pytest.approx((nnunet + 0.1 * penalty).item(), rel=1e-5)


def test_gradients_flow_and_inputs_are_not_modified():
    z, y = region_inputs(5)
    z = z.clone().requires_grad_()
    before = z.detach().clone()
    RegionMbLSLoss(1.0, 1.0)(z, y).backward()
    assert torch.equal(z.detach(), before) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_bad_target_and_losses_without_a_sigmoid_form_are_refused():
    z, y = region_inputs(6)
    with pytest.raises(ValueError, match=r"target shape .* does not fit logits .* ignore channel"):
        RegionBCELoss(ignore_label=4)(z, y)  # the ignore channel is missing
    with pytest.raises(ValueError, match="margin=-1"):
        RegionMbLSLoss(margin=-1)
    for name in ("ecp", "svls", "nacl"):
        with pytest.raises(ValueError, match=r"no sigmoid form.*\['ce', 'focal', 'ls', 'mbls', 'mbls_dice'\]"):
            build_region_loss(name)
    assert type(build_region_loss("mbls", margin=5.0)) is RegionMbLSLoss
