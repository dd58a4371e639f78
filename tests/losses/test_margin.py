"""nnunet_mbls.losses.margin: the margin penalty (MbLS) and Dice+CE+margin (MbLS with nnU-Net's Dice) against CE,
nnU-Net's Dice+CE and plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from nnunet_mbls.losses import CELoss, MbLSDiceLoss, MbLSLoss, build_loss

from helpers.losses import IGNORE, make_inputs, naive_loss


def test_margin_penalty_gradient_is_exact_and_shares_ties():
    from nnunet_mbls.losses import margin_penalty_map

    x = (torch.randn(2, 4, 3, 5, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: margin_penalty_map(v, 1.0), (x,))
    tied = torch.tensor([[[5.0], [5.0], [-10.0]]], requires_grad=True)  # (B=1, C=3, 1 voxel), two maxima
    margin_penalty_map(tied, 1.0).sum().backward()
    assert tied.grad[0, :, 0].tolist() == [0.5, 0.5, -1.0]  # the penalised class's -1 is shared by the maxima


def test_mbls_with_huge_margin_equals_ce():
    logits, target = make_inputs((5, 5, 5), with_ignore=True, seed=4)
    mbls = MbLSLoss(margin=1e6, lam=10.0, ignore_label=IGNORE)(logits.float(), target)
    ce = CELoss(ignore_label=IGNORE)(logits.float(), target)
    torch_ce = torch.nn.functional.cross_entropy(logits.float(), target[:, 0], ignore_index=IGNORE)
    assert mbls.item() == pytest.approx(ce.item(), rel=1e-7)
    assert ce.item() == pytest.approx(torch_ce.item(), rel=1e-6)


def test_mbls_dice_is_nnunet_dice_ce_plus_the_margin_penalty():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, target = make_inputs((6, 6, 6), with_ignore=True, seed=6)
    reference = DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
        ignore_label=IGNORE, dice_class=MemoryEfficientSoftDiceLoss,
    )(logits.float(), target)
    penalty = naive_loss("mbls", logits.numpy(), target[:, 0].numpy(), IGNORE, margin=2.0, lam=0.5) - naive_loss(
        "ce", logits.numpy(), target[:, 0].numpy(), IGNORE
    )
    got = MbLSDiceLoss(margin=2.0, lam=0.5, ignore_label=IGNORE, batch_dice=True)(logits.float(), target)
    assert penalty > 0.01
    assert got.item() == pytest.approx(reference.item() + penalty, rel=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("with_ignore", [False, True], ids=["no_ignore", "ignore"])
def test_mbls_dice_value_and_gradient_equal_nnunet_dice_ce_plus_penalty_by_autograd(batch_dice, with_ignore):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, target = make_inputs((5, 6, 4), with_ignore, seed=10)
    ignore = IGNORE if with_ignore else None
    x_ref, x = logits.float().requires_grad_(), logits.float().requires_grad_()
    dc_ce = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    gap = (x_ref.max(dim=1, keepdim=True).values - x_ref - 2.0).clamp_min(0).sum(dim=1)  # plain autograd penalty
    keep = torch.ones_like(target[:, 0], dtype=torch.bool) if ignore is None else target[:, 0] != ignore
    reference = dc_ce(x_ref, target) + 0.5 / 3 * gap[keep].mean()
    reference.backward()
    got = MbLSDiceLoss(margin=2.0, lam=0.5, ignore_label=ignore, batch_dice=batch_dice)(x, target)
    got.backward()
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-7)


def test_mbls_dice_gradient_is_nnunet_dice_ce_plus_the_plain_margin_gradient():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 4, generator=g) * 3
    target = torch.randint(0, 4, (2, 1, 6, 5, 4), generator=g)
    ref = logits.clone().requires_grad_()
    dc_ce = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    gap = ref.max(1, keepdim=True).values - ref
    (dc_ce(ref, target) + 0.5 * F.relu(gap - 2.0).mean()).backward()
    x = logits.clone().requires_grad_()
    build_loss("mbls_dice", margin=2.0, lam=0.5)(x, target).backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-4, atol=1e-6)
