"""``nnunet-mbls maps``: probability/uncertainty maps and QC from a nnUNetv2_predict --save_probabilities folder."""

from __future__ import annotations

import argparse

from .options import add_map_and_flag_options, add_temperature_options, flag_rule_from, print_qc_summary


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("maps", help="probability/uncertainty maps and QC from a nnUNetv2_predict --save_probabilities folder")
    p.add_argument("-i", required=True, help="folder with .npz, .pkl and segmentations written by nnUNetv2_predict")
    p.add_argument("-o", required=True, help="output folder: maps/, qc.csv, qc.json")
    add_temperature_options(p, required=False, t_help="apply temperature T first: normalize(p ** (1/T))")
    add_map_and_flag_options(p, ["probabilities", "entropy"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.saved_maps import maps_from_probabilities

    qc = maps_from_probabilities(args.i, args.o, temperature=args.t, calibration_json=args.calibration_json,
                                 maps=args.maps, maps_dtype=args.maps_dtype, flag_rule=flag_rule_from(args),
                                 conformal_json=args.conformal_json)
    print_qc_summary(qc)
    return 0
