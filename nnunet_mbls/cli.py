"""``nnunet-mbls``: the command line of the plugin. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys


def cmd_env(args: argparse.Namespace) -> int:
    from .paths import ext_trainer_folder

    print(f"export nnUNet_extTrainer={ext_trainer_folder()}")
    return 0


def cmd_trainers(args: argparse.Namespace) -> int:
    from .losses import LOSSES
    from .trainers import TRAINERS

    width = max(len(cls.__name__) for cls in TRAINERS)
    print(f"{'trainer':<{width}}  loss")
    print(f"{'nnUNetTrainer':<{width}}  stock nnU-Net Dice + CE (DC_and_CE_loss), the anchor to beat")
    for cls in TRAINERS:
        params = ", ".join(f"{k}={v:g}" for k, v in cls.loss_kwargs.items())
        print(f"{cls.__name__:<{width}}  {LOSSES[cls.loss_name].__name__}({params})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-mbls",
        description="Calibrated nnU-Net v2: MbLS and baseline trainers, calibration metrics, temperature scaling.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the export line that lets nnU-Net find our trainers").set_defaults(func=cmd_env)
    sub.add_parser("trainers", help="list every trainer with its loss and hyper-parameters").set_defaults(
        func=cmd_trainers
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
