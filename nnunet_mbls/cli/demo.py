"""``nnunet-mbls demo``: the whole pipeline on a generated dataset, stock nnU-Net vs MbLS."""

from __future__ import annotations

import argparse

from .options import STOCK_TRAINER, add_device_option


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline on a generated dataset (CPU is fine): stock nnU-Net vs MbLS")
    p.add_argument("-o", default="nnunet_mbls_demo", help="output folder (default ./nnunet_mbls_demo); nnU-Net's path variables win when set")
    p.add_argument("--quick", action="store_true", help="tiny dataset and schedule (a smoke test, about 2 minutes)")
    p.add_argument("-tr", nargs="+", default=[STOCK_TRAINER, "nnUNetTrainerMbLS"], help="trainers (default: stock and MbLS)")
    add_device_option(p)
    p.add_argument("--epochs", type=int, help="override the schedule's epochs (default 50, quick 2)")
    p.add_argument("--iterations", type=int, help="override iterations per epoch (default 20, quick 3)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.o, quick=args.quick, trainers=args.tr, device=args.device, epochs=args.epochs,
             iterations=args.iterations, seed=args.seed)
    return 0
