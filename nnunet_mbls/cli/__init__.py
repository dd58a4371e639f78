"""``nnunet-mbls``: the command line of the plugin, one module per command.

Each command module has ``add_parser(subparsers)`` and ``run(args)``; ``options`` holds the options several
commands share. Building the parser imports neither torch nor nnU-Net: ``--help``, ``env`` and ``trainers``
start fast, and each ``run`` imports what it needs.
"""

from __future__ import annotations

import argparse
import sys

from . import apply_temperature, benchmark, calibrate, conformal, dataset, demo, env, evaluate, maps, predict, trainers
from .options import default_device

__all__ = ["main", "build_parser", "default_device"]

#: the commands in the order ``--help`` lists them
COMMANDS = (env, trainers, evaluate, calibrate, apply_temperature, conformal, predict, maps, benchmark, demo, dataset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-mbls",
        description="Calibrated nnU-Net v2: MbLS and baseline trainers, calibration metrics, temperature scaling.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from ..errors import NnunetMblsError

    args = build_parser().parse_args(argv)
    if getattr(args, "device", "") is None:  # resolved here, not in the parser: --help and env import no torch
        args.device = default_device()
    try:
        return args.func(args)
    except (NnunetMblsError, ValueError, OSError, RuntimeError) as error:
        # errors of bad input or missing prerequisites: one clear line (set NNUNET_MBLS_DEBUG=1 for the traceback)
        if os.environ.get("NNUNET_MBLS_DEBUG"):
            raise
        print(f"nnunet-mbls {args.command}: error: {error}", file=sys.stderr)
        return 1
