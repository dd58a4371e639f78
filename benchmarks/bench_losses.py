"""Forward+backward time and peak extra memory of every registered loss against stock nnU-Net Dice+CE.

Every loss, including the anchor ``DC_and_CE_loss`` configured exactly as ``nnUNetTrainer._build_loss``
does, is wrapped in nnU-Net's ``DeepSupervisionWrapper`` with nnU-Net's weights (1/2^i, lowest scale 0,
normalised) and fed the same pyramid of deep-supervision outputs: logits halved per scale down to a
side of 8 voxels (3D 128^3: 128, 64, 32, 16, 8; 2D 256^2: 256 ... 8), targets (B, 1, *spatial) int16
downsampled by nearest neighbour (every 2^i-th voxel), as nnU-Net's data loader sends them.

Measured per (loss, shape): one call = loss forward + ``torch.autograd.grad`` of the loss w.r.t. every
scale's logits (the gradients the network would receive). Rounds alternate the losses (order rotated
per round) so drift from other jobs hits all of them alike; the time ratio is the median over rounds
of t(loss) / t(DC+CE) within the round (also the ratio of the fastest rounds). Peak extra memory: see
``_common.peak_extra_bytes`` (the logits gradients, which every loss returns, are included). On CUDA
also autocast fp16 and bf16 variants (logits arrive in that dtype, the loss runs under autocast).

    python benchmarks/bench_losses.py [--quick] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MiB, load_average, machine_info, markdown_table, paired_rounds,  # noqa: E402
                     peak_extra_bytes, save_json, set_threads)

from nnunet_mbls.losses import LOSSES, build_loss  # noqa: E402
from nnunet_mbls.trainers.base import deep_supervision_weights  # noqa: E402

ANCHOR = "DC_and_CE"
FULL_SHAPES = {"3d": (2, (128, 128, 128)), "2d": (12, (256, 256))}
QUICK_SHAPES = {"3d": (2, (64, 64, 64)), "2d": (4, (128, 128))}
MIN_SIDE = 8


def stock_dc_and_ce() -> torch.nn.Module:
    """nnU-Net's loss exactly as nnUNetTrainer._build_loss builds it for a label (non-region) dataset."""
    return DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


def make_pyramid(batch: int, classes: int, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deep-supervision logits (leaf tensors requiring grad) and nearest-downsampled int16 targets."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch, 1, *spatial), generator=gen, dtype=torch.int16)
    logits, targets, factor = [], [], 1
    while min(spatial) // factor >= MIN_SIDE:
        shape = (batch, classes, *(s // factor for s in spatial))
        logits.append((3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_())
        targets.append(target[(slice(None), slice(None)) + (slice(None, None, factor),) * len(spatial)].to(device))
        factor *= 2
    return logits, targets


def build_losses(num_scales: int, device: torch.device, names: list[str] | None = None) -> dict[str, torch.nn.Module]:
    weights = deep_supervision_weights(num_scales, is_ddp=False, compiled=False)
    plain = {ANCHOR: stock_dc_and_ce(), **{name: build_loss(name) for name in (names or LOSSES)}}
    return {name: DeepSupervisionWrapper(loss, weights).to(device) for name, loss in plain.items()}


def step_fn(loss: torch.nn.Module, logits: list[torch.Tensor], targets: list[torch.Tensor],
            device: torch.device, autocast_dtype: torch.dtype | None):
    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            value = loss(logits, targets)
        return torch.autograd.grad(value, logits, allow_unused=True)  # lowest scale has weight 0

    return step


def bench_case(dim: str, classes: int, variant: str, args, device: torch.device) -> list[dict]:
    batch, spatial = (QUICK_SHAPES if args.quick else FULL_SHAPES)[dim]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[variant]
    autocast_dtype = None if variant == "fp32" else dtype
    logits, targets = make_pyramid(batch, classes, spatial, dtype, device)
    losses = build_losses(len(logits), device, args.losses)
    steps = {name: step_fn(loss, logits, targets, device, autocast_dtype) for name, loss in losses.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    timing = paired_rounds(steps, ANCHOR, args.repeats, device)
    memory = {name: peak_extra_bytes(step, device) for name, step in steps.items()} if args.memory else {}
    shape = f"({batch}, {classes}, {' x '.join(map(str, spatial))})"
    rows = []
    for name in steps:
        row = {"dim": dim, "classes": classes, "variant": variant, "shape": shape, "scales": len(logits),
               "loss": name, **timing[name], "loadavg": load_average()}
        if memory:
            row.update(peak_extra_bytes=memory[name], memory_ratio=memory[name] / memory[ANCHOR])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes: 3D (2, C, 64^3), 2D (4, C, 128^2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per shape (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--dims", nargs="+", choices=["3d", "2d"], default=["3d", "2d"])
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), help="subset of the registered losses")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory pass")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    parser.add_argument("--json", metavar="OUT", help="write the raw numbers to this JSON file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    variants = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"]
    info = machine_info()
    print(f"machine: {info}")
    rows = []
    for dim in args.dims:
        for classes in args.classes:
            for variant in variants:
                case_rows = bench_case(dim, classes, variant, args, device)
                rows += case_rows
                r0 = case_rows[0]
                print(f"\n### {dim} {r0['shape']}, {r0['scales']} deep-supervision scales, {variant}, "
                      f"{device.type}, load average {r0['loadavg']}\n")
                print(markdown_table(
                    ["loss", "fwd+bwd median (ms)", "time / DC+CE (median of rounds)", "fastest / fastest DC+CE",
                     "peak extra (MiB)", "memory / DC+CE"],
                    [[r["loss"], 1000 * r["wall_median_s"], r["wall_ratio"], r["wall_min_ratio"],
                      r.get("peak_extra_bytes", float("nan")) / MiB, r.get("memory_ratio", float("nan"))]
                     for r in case_rows]), flush=True)
    info["loadavg_end"] = load_average()
    print(f"\nload average at the end: {info['loadavg_end']}")
    save_json(args.json, {"machine": info, "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
