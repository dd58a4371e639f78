"""``nnunet-mbls predict``: nnUNetv2_predict plus calibrated probability/uncertainty maps and a QC table."""

from __future__ import annotations

import argparse

from .options import (STEP_SIZE, STOCK_TRAINER, add_device_option, add_map_and_flag_options, add_model_options,
                      add_sliding_window_options, flag_rule_from, print_qc_summary)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="nnUNetv2_predict plus calibrated probability/uncertainty maps (NIfTI) and a QC table")
    p.add_argument("-i", required=True, help="input folder of images (nnU-Net naming, CASE_0000.nii.gz ...)")
    p.add_argument("-o", required=True, help="output folder: segmentations, maps/, qc.csv, qc.json")
    add_model_options(p, folds_help="folds (default 0 1 2 3 4)", default_folds=["0", "1", "2", "3", "4"],
                      trainer_help=f"trainer (default {STOCK_TRAINER})")
    p.add_argument("-chk", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("--calibrated", action="store_true",
                   help="use each fold's calibration: checkpoint_final_calibrated.pth, else the temperature of its calibration.json")
    add_map_and_flag_options(p, None)
    add_device_option(p)
    add_sliding_window_options(p, step_help=f"sliding-window step as a fraction of the patch (default {STEP_SIZE})",
                               tta_help="no mirroring test-time augmentation")
    p.add_argument("-prev_stage_predictions", help="cascade stages: folder of the previous stage's segmentations "
                                                   "(as nnUNetv2_predict takes them)")
    p.add_argument("-npp", type=int, default=3, help="preprocessing worker processes (default 3; 0 = in this process)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.predict import predict

    qc = predict(args.i, args.o, args.d, args.c, args.f, args.tr, args.p, checkpoint=args.chk, calibrated=args.calibrated,
                 maps=args.maps or (), maps_dtype=args.maps_dtype, device=args.device, step_size=args.step_size,
                 disable_tta=args.disable_tta, num_processes_preprocessing=args.npp, flag_rule=flag_rule_from(args),
                 conformal_json=args.conformal_json, prev_stage_predictions=args.prev_stage_predictions)
    print_qc_summary(qc)
    return 0
