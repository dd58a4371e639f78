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


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .calibration.reliability import plot_reliability
    from .evaluation import evaluate_folder
    from .io import atomic_write_json

    dataset_json = json.loads(Path(args.djfile).read_text()) if args.djfile else None
    result = evaluate_folder(args.ref, args.pred, dataset_json, region=args.region, n_bins=args.bins,
                             boundary_width=args.boundary_width)
    out = Path(args.o) if args.o else Path(args.pred) / f"calibration_metrics_{args.region}.json"
    atomic_write_json(out, result)
    png = out.with_suffix(".png")
    plot_reliability({f"{args.region} voxels (ECE {result['mean']['ece']:.4f})": result["reliability"]}, png,
                     title=f"{Path(args.pred).name}: reliability, {args.region} voxels, pooled")
    print_metrics(result)
    print(f"wrote {out} and {png}")
    return 0


def print_metrics(result: dict) -> None:
    mean = result["mean"]
    print(f"{result['num_cases']} cases, region {result['region']} (mean ± std over cases):")
    for key in ("ece", "cece", "nll", "brier"):
        print(f"  {key:<6} {mean[key]:.4f} ± {mean[key + '_std']:.4f}")
    for key in ("dice", "hd95"):
        names = [k for k in mean[key] if not k.endswith(("_std", "_n"))]
        print(f"  {key:<6} " + ", ".join(f"{n} {mean[key][n]:.4f}" for n in names))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_trained_model

    summary = calibrate_trained_model(args.d, args.c, args.f, args.tr, args.p, device=args.device,
                                      max_voxels=args.max_voxels, seed=args.seed, region=args.region)
    print(f"T = {summary['temperature']:.4f}")
    return 0


def cmd_apply_temperature(args: argparse.Namespace) -> int:
    from .calibration.files import apply_temperature_to_folder

    apply_temperature_to_folder(args.i, args.o, temperature=args.t, calibration_json=args.calibration_json)
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

    p = sub.add_parser("evaluate", help="calibration (ECE, CECE, NLL, Brier) and Dice/HD95 of a folder of nnU-Net .npz files")
    p.add_argument("-ref", required=True, help="folder of reference segmentations (e.g. nnUNet_preprocessed/DatasetX/gt_segmentations)")
    p.add_argument("-pred", required=True, help="folder of .npz probabilities (nnUNetv2_train --npz, nnUNetv2_predict --save_probabilities)")
    p.add_argument("-djfile", help="dataset.json (default: found next to -pred or -ref)")
    p.add_argument("--region", choices=["fg", "all", "boundary"], default="fg",
                   help="voxels scored: fg = ground truth != 0 (the paper's, default), all = inside nnU-Net's crop box, boundary = band around label boundaries")
    p.add_argument("--bins", type=int, default=15, help="equal-width confidence bins (default 15)")
    p.add_argument("--boundary-width", type=int, default=2, help="half-width in voxels of the boundary band (default 2)")
    p.add_argument("-o", help="output JSON (default: PRED/calibration_metrics_<region>.json); a reliability PNG is written next to it")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit temperature scaling on a trained fold; write calibration.json and checkpoint_final_calibrated.pth")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", required=True, help="fold")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer: stock models work too)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-device", default=default_device(), help="device for a missing validation run (default: cuda if available, else cpu)")
    p.add_argument("--max-voxels", type=int, default=1_000_000, help="voxel subsample size for the temperature fit (default 1e6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voxel subsample (default 0)")
    p.add_argument("--region", choices=["fg", "all", "boundary"], default="fg", help="voxels of the reported metrics (default fg)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("apply-temperature", help="rescale the probabilities of .npz files: normalize(p ** (1/T))")
    p.add_argument("-i", required=True, help="input folder of nnU-Net .npz (+ .pkl) files")
    p.add_argument("-o", required=True, help="output folder (must differ from -i; nothing is overwritten)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-t", type=float, help="temperature T > 0")
    group.add_argument("--calibration-json", help="take T from a calibration.json written by calibrate")
    p.set_defaults(func=cmd_apply_temperature)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
