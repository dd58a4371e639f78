"""nnunet_mbls.losses.registry: every loss built by name against a naive per-voxel reference written with explicit
loops over voxels, and in two-process DDP."""

from __future__ import annotations

import pytest
import torch

from nnunet_mbls.losses import CELoss, EntropyPenaltyLoss, FocalLoss, LabelSmoothingLoss, MbLSLoss, build_loss

from helpers.ddp import ddp_inputs, ddp_losses, ddp_worker
from helpers.losses import DEFAULTS, IGNORE, make_inputs, naive_loss


@pytest.mark.parametrize("name", list(DEFAULTS))
@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_ignore", [False, True], ids=["no_ignore", "ignore"])
def test_loss_matches_naive_reference(name, spatial, with_ignore):
    logits, target = make_inputs(spatial, with_ignore)
    ignore = IGNORE if with_ignore else None
    loss = build_loss(name, ignore_label=ignore, **DEFAULTS[name])
    expected = naive_loss(name, logits.numpy(), target[:, 0].numpy(), ignore, **DEFAULTS[name])
    got = loss(logits.float(), target)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the (B, *spatial) target layout gives the same value
    assert loss(logits.float(), target[:, 0]).item() == pytest.approx(got.item(), rel=1e-6)


def test_mbls_zero_lambda_and_focal_zero_gamma_and_smoothing_zero_alpha_are_ce():
    logits, target = make_inputs((6, 7), with_ignore=False, seed=5)
    ce = CELoss()(logits.float(), target).item()
    for loss in (MbLSLoss(lam=0.0), FocalLoss(gamma=0.0), LabelSmoothingLoss(alpha=0.0), EntropyPenaltyLoss(alpha=0.0)):
        assert loss(logits.float(), target).item() == pytest.approx(ce, rel=1e-6), loss


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown"):
        build_loss("dice")


def test_two_process_ddp_losses_gradients_and_online_ece_equal_single_process(tmp_path):
    """nnU-Net averages gradients over ranks; every loss (incl. Dice+CE+margin with batch Dice, whose tp/fp/fn
    nnU-Net gathers across ranks) then gives the single-process full-batch loss and gradients, and the summed
    online-ECE states the full-batch ECE. Equal voxel counts per rank: with an ignore label, CE-type losses
    average per-rank means, exactly as stock nnU-Net's CE does."""
    from nnunet_mbls.trainers.online_ece import OnlineECE

    world = 2
    torch.multiprocessing.spawn(ddp_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    logits, target, ecetarget = ddp_inputs(world)
    for name, loss in ddp_losses(ddp=False).items():
        x = logits.clone().requires_grad_()
        full = loss(x, target)
        full.backward()
        mean_over_ranks = sum(r[name][0] for r in ranks) / world
        assert mean_over_ranks == pytest.approx(full.item(), rel=1e-5), name
        if name == "mbls_dice":  # the Dice statistics really were gathered: a rank alone gives another value
            assert ranks[0][name][0] != pytest.approx(ranks[0][name + "_this_rank_only"], rel=1e-4)
        # DDP's all-reduce averages the gradients of the ranks: each rank's share equals the full-batch gradient
        ddp_grad = torch.cat([r[name][1] for r in ranks]) / world
        torch.testing.assert_close(ddp_grad, x.grad, rtol=1e-4, atol=1e-8, msg=name)
    single = OnlineECE(num_classes=3).batch_state(logits, ecetarget, ignore_label=3)
    expected = OnlineECE(num_classes=3).ece_from_state(single)
    assert ranks[0]["ece"] == pytest.approx(expected, abs=1e-12) and ranks[1]["ece"] == ranks[0]["ece"]
