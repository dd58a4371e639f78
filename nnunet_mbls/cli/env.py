"""``nnunet-mbls env``: print the export line that lets nnU-Net find our trainers."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="print the export line that lets nnU-Net find our trainers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..paths import ext_trainer_folder

    # keeps folders already listed in nnUNet_extTrainer, so `eval "$(nnunet-mbls env)"` composes
    print(f'export nnUNet_extTrainer="{ext_trainer_folder()}${{nnUNet_extTrainer:+:$nnUNet_extTrainer}}"')
    return 0
