"""``nnunet-mbls calibrate``: fit temperature (or vector) scaling on trained folds, folded into their checkpoints."""

from __future__ import annotations

import argparse

from ..defaults import FIT_REGION, FIT_REGIONS, MAX_VOXELS, METRIC_REGION, SEED
from .options import (STEP_SIZE, STOCK_TRAINER, add_device_option, add_model_options, add_num_processes_option,
                      add_region_option, add_sliding_window_options)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit temperature scaling on trained folds; write calibration.json and checkpoint_final_calibrated.pth")
    add_model_options(p, folds_help="fold(s); several folds get ONE temperature fitted on their pooled out-of-fold "
                                    "validation cases and folded into each (the calibrated ensemble of "
                                    "nnUNetv2_predict -f ...)",
                      trainer_help=f"trainer (default {STOCK_TRAINER}: stock models work too)",
                      configurations_help="configuration, e.g. 3d_fullres; several (e.g. 2d 3d_fullres): ONE temperature "
                                          "for their ensemble as nnUNetv2_ensemble averages it, fitted on their "
                                          "out-of-fold --npz probabilities and applied with apply-temperature")
    add_device_option(p, "device for a missing validation run (default: cuda if available, else cpu)")
    p.add_argument("--calibration-set", nargs=2, metavar=("IMAGES", "LABELS"),
                   help="fit T on the listed folds' ensemble output (nnU-Net's predictor, TTA as deployed) on a labelled "
                        "held-out set instead of the validation cases")
    add_sliding_window_options(p, step_help=f"--calibration-set: sliding-window step (default {STEP_SIZE})",
                               tta_help="--calibration-set: predict without mirroring, as deployed")
    p.add_argument("--method", choices=["temperature", "vector"], default="temperature",
                   help="temperature (default): one scalar T; vector: a scale and bias per class on the logits (one more "
                        "inference pass over the validation cases), kept only if its cross-validated NLL over cases beats T")
    p.add_argument("--no-fallback", action="store_true",
                   help="--method vector: keep vector scaling even when it does not beat temperature scaling (recorded)")
    p.add_argument("--fit-region", choices=list(FIT_REGIONS), default=None,
                   help=f"voxels T is fitted on: all (inside nnU-Net's crop box) or fg (ground truth != 0); "
                        f"default {FIT_REGION}, see docs/BENCHMARKS.md")
    p.add_argument("--max-voxels", type=int, default=MAX_VOXELS, help="voxel subsample size for the temperature fit (default 1e6)")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the voxel subsample (default {SEED})")
    add_region_option(p, f"voxels of the reported metrics (default {METRIC_REGION})")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when the calibration (of the fold, or of the ensemble of the folds) is newer than the checkpoints")
    add_num_processes_option(p, "validation cases")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration.folds import (calibrate_on_calibration_set, calibrate_trained_model, calibrate_vector,
                                     calibration_problem, ensemble_problem, prepare_fold_for_calibration)
    from ..layout import FoldFolder

    common = dict(max_voxels=args.max_voxels, seed=args.seed, region=args.region, fit_region=args.fit_region)
    if len(args.c) > 1:
        return run_configuration_ensemble(args, common)
    args.c = args.c[0]
    if args.method == "vector":
        if args.calibration_set:
            raise ValueError("--method vector fits on the validation logits of the folds; it does not take "
                             "--calibration-set (use --method temperature there)")
        folders = [prepare_fold_for_calibration(args.d, args.c, f, args.tr, args.p, args.device, args.region,
                                                args.fit_region or FIT_REGION, args.seed)[0] for f in args.f]
        summary = calibrate_vector(folders, device=args.device, fallback=not args.no_fallback, **common)
        print(f"method: {summary['method'].get('chosen')} ({summary['method']['reason']})")
        return 0
    if args.calibration_set:
        summary = calibrate_on_calibration_set(args.d, args.c, args.f, args.tr, args.p, *args.calibration_set,
                                               device=args.device, step_size=args.step_size,
                                               disable_tta=args.disable_tta, num_processes=args.np, **common)
        print(f"T = {summary['temperature']:.4f} (calibration set), folded into folds {', '.join(summary['folds'])}")
        return 0
    if args.if_missing:
        folders = [FoldFolder.of(args.d, args.c, f, args.tr, args.p).path for f in args.f]
        problem = calibration_problem(folders[0]) if len(folders) == 1 else ensemble_problem(folders)
        if problem is None:
            print("calibration is up to date; nothing to do (--if-missing)")
            return 0
        print(f"calibrating (--if-missing): {problem}")
    summary = calibrate_trained_model(args.d, args.c, args.f if len(args.f) > 1 else args.f[0], args.tr, args.p,
                                      device=args.device, num_processes=args.np, **common)
    shared = f", shared by folds {', '.join(summary['folds'])}" if "folds" in summary else ""
    print(f"T = {summary['temperature']:.4f}{shared}")
    return 0


def run_configuration_ensemble(args: argparse.Namespace, common: dict) -> int:
    """``-c A B ...``: one temperature for the ensemble of configurations (see
    :mod:`nnunet_mbls.calibration.folds.configurations`)."""
    from ..calibration.folds.configurations import calibrate_configuration_ensemble

    for flag, given in (("--method vector", args.method == "vector"), ("--calibration-set", args.calibration_set),
                        ("--if-missing", args.if_missing)):
        if given:
            raise ValueError(f"{flag} is for one configuration; several -c ({' '.join(args.c)}) fit one temperature "
                             f"on their averaged out-of-fold probabilities (drop {flag})")
    record = calibrate_configuration_ensemble(args.d, args.c, args.f, args.tr, args.p, num_processes=args.np, **common)
    print(f"T = {record['temperature']:.4f} for the ensemble of {', '.join(args.c)} (folds {', '.join(record['folds'])}); "
          f"wrote {record['record_file']}\napply it: {record['apply']}")
    return 0
