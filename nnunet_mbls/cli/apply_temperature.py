"""``nnunet-mbls apply-temperature``: rescale the probabilities of a folder of ``.npz`` files by a temperature."""

from __future__ import annotations

import argparse

from .options import add_temperature_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("apply-temperature", help="rescale the probabilities of .npz files: normalize(p ** (1/T))")
    p.add_argument("-i", required=True, help="input folder of nnU-Net .npz (+ .pkl) files")
    p.add_argument("-o", required=True, help="output folder (must differ from -i; nothing is overwritten)")
    add_temperature_options(p, required=True, t_help="temperature T > 0")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration.files import apply_temperature_to_folder

    apply_temperature_to_folder(args.i, args.o, temperature=args.t, calibration_json=args.calibration_json)
    return 0
