"""Two-process DDP (gloo on the CPU): every loss and the online ECE on each rank's share of one batch.

The worker lives here, in an importable module, because spawned processes import it by name.
"""

from __future__ import annotations

import os

import torch


def ddp_inputs(world: int):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2 * world, 3, 6, 5, 4, generator=g) * 4
    target = torch.randint(0, 3, (2 * world, 1, 6, 5, 4), generator=g)
    ecetarget = target.clone()
    ecetarget[torch.rand(target.shape, generator=g) < 0.2] = 3  # ignore label for the ECE check
    return logits, target, ecetarget


def ddp_losses(ddp: bool):
    from nnunet_mbls.losses import LOSSES, build_loss

    return {name: build_loss(name, **({"margin": 2.0, "lam": 0.3, "batch_dice": True, "ddp": ddp}
                                      if name == "mbls_dice" else {"margin": 2.0, "lam": 0.3} if name == "mbls" else {}))
            for name in LOSSES}


def ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from nnunet_mbls.trainers.online_ece import OnlineECE, sum_over_ranks

    torch.set_num_threads(1)
    # a file rendezvous: no fixed port that another job on a shared machine could take
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        logits, target, ecetarget = ddp_inputs(world)
        part = slice(2 * rank, 2 * rank + 2)  # equal shares, as nnU-Net's per-GPU batch
        out = {}
        local = ddp_losses(ddp=False)
        for name, loss in ddp_losses(ddp=True).items():
            x = logits[part].clone().requires_grad_()
            value = loss(x, target[part])
            value.backward()
            out[name] = (value.item(), x.grad)
            out[name + "_this_rank_only"] = local[name](logits[part], target[part]).item()
        state = OnlineECE(num_classes=3).batch_state(logits[part], ecetarget[part], ignore_label=3)
        out["ece"] = OnlineECE(num_classes=3).ece_from_state(sum_over_ranks(state))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
