"""``nnunet-mbls evaluate``: calibration and segmentation metrics of a folder of nnU-Net ``.npz`` probabilities."""

from __future__ import annotations

import argparse

from ..defaults import BOUNDARY_WIDTH, N_BINS, REGIONS
from .options import add_num_processes_option, add_region_option


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="calibration (ECE, CECE, NLL, Brier) and Dice/HD95 of a folder of nnU-Net .npz files")
    p.add_argument("-ref", required=True, help="folder of reference segmentations (e.g. nnUNet_preprocessed/DatasetX/gt_segmentations)")
    p.add_argument("-pred", required=True, help="folder of .npz probabilities (nnUNetv2_train --npz, nnUNetv2_predict --save_probabilities)")
    p.add_argument("-djfile", help="dataset.json (default: found next to -pred or -ref)")
    p.add_argument("-pfile", help="plans.json of the model (default: found next to -pred, where nnU-Net writes it); its "
                                  "transpose_forward maps nnU-Net's crop box to the image axes")
    add_region_option(p, "voxels scored: fg = ground truth != 0 (the paper's, default), all = inside nnU-Net's crop box, "
                         "boundary = band around label boundaries")
    p.add_argument("--bins", type=int, default=N_BINS, help=f"equal-width confidence bins (default {N_BINS})")
    p.add_argument("--boundary-width", type=int, default=BOUNDARY_WIDTH,
                   help=f"half-width in voxels of the boundary band (default {BOUNDARY_WIDTH})")
    p.add_argument("--chill", action="store_true",
                   help="evaluate only the predicted cases (e.g. one fold's validation/ against all of gt_segmentations), as nnUNetv2_evaluate_folder -chill")
    p.add_argument("-o", help="output JSON (default: PRED/calibration_metrics_<region>.json); a reliability PNG is written next to it")
    add_num_processes_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..calibration.reliability import plot_reliability
    from ..calibration.evaluation import evaluate_folder
    from ..io import atomic_write_json, read_json_file, refuse_outputs_over_inputs

    out = Path(args.o) if args.o else Path(args.pred) / f"calibration_metrics_{args.region}.json"
    png = out.with_suffix(".png")
    refuse_outputs_over_inputs({"-o": out, "-o (its reliability diagram)": png},
                               {"-djfile": args.djfile or [], "-pfile": args.pfile or []},
                               {"-ref": args.ref, "-pred": args.pred},
                               replaceable=[f"calibration_metrics_{r}.{e}" for r in REGIONS for e in ("json", "png")])
    dataset_json = read_json_file(args.djfile, "-djfile") if args.djfile else None
    result = evaluate_folder(args.ref, args.pred, dataset_json, region=args.region, n_bins=args.bins,
                             boundary_width=args.boundary_width, chill=args.chill, plans=args.pfile,
                             num_processes=args.np)
    atomic_write_json(out, result)
    plot_reliability({f"{args.region} voxels (ECE {result['mean']['ece']:.4f})": result["reliability"]}, png,
                     title=f"{Path(args.pred).name}: reliability, {args.region} voxels, pooled")
    print_metrics(result)
    print(f"wrote {out} and {png}")
    return 0


def print_metrics(result: dict) -> None:
    mean = result["mean"]
    print(f"{result['num_cases']} cases, region {result['region']} (mean ± std over cases):")
    for key in ("ece", "cece", "nll", "brier", "mce", "ece_adaptive"):
        print(f"  {key:<12} {mean[key]:.4f} ± {mean[key + '_std']:.4f}")
    for key in ("dice", "hd95"):
        names = [k for k in mean[key] if not k.endswith(("_std", "_n"))]
        print(f"  {key:<12} " + ", ".join(f"{n} {mean[key][n]:.4f}" for n in names))
