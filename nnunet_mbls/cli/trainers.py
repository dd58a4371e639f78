"""``nnunet-mbls trainers``: list every trainer with its loss and hyper-parameters."""

from __future__ import annotations

import argparse

from .options import STOCK_TRAINER


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("trainers", help="list every trainer with its loss and hyper-parameters")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..trainers.catalog import CATALOG  # the classes' own source of truth, without importing nnU-Net

    width = max(len(spec.name) for spec in CATALOG)
    print(f"{'trainer':<{width}}  loss")
    print(f"{STOCK_TRAINER:<{width}}  stock nnU-Net Dice + CE (DC_and_CE_loss), the anchor to beat")
    for spec in CATALOG:
        params = ", ".join(f"{k}={v:g}" for k, v in spec.loss_kwargs.items())
        print(f"{spec.name:<{width}}  {spec.loss_class_name}({params})")
    return 0
