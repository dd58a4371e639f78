"""``nnunet-mbls dataset``: write a synthetic or real-anatomy dataset in nnU-Net's raw or MSD layout."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dataset", help="write a dataset (nnU-Net raw or MSD layout): synthetic, ch2-deepgm (real MRI anatomy), totalseg-abdomen (real CT)")
    p.add_argument("kind", choices=["synthetic", "ch2-deepgm", "totalseg-abdomen"])
    p.add_argument("-o", help="output folder (default: $nnUNet_raw for --layout nnunet, the current folder for --layout msd)")
    p.add_argument("--raw", help=argparse.SUPPRESS)  # the earlier name of -o
    p.add_argument("--layout", choices=["nnunet", "msd"], default="nnunet",
                   help="nnunet: DatasetXXX_Name in nnU-Net's raw format (default); msd: a Medical Segmentation Decathlon "
                        "TaskXXX_Name folder (4D NIfTI for several channels) for nnUNetv2_convert_MSD_dataset")
    p.add_argument("--test-cases", type=int, default=0, help="msd layout: extra unlabelled cases in imagesTs (default 0)")
    p.add_argument("--id", type=int, help="dataset id (default 990 synthetic, 991 ch2-deepgm, 992 totalseg-abdomen)")
    p.add_argument("-n", "--num-cases", type=int, default=20, help="number of training cases (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs="+", help="synthetic only: 2 (2D) or 3 (3D) sizes, e.g. 96 96 or 32 48 48")
    p.add_argument("--spacing", type=float, nargs="+", help="synthetic only: mm per axis, in the order of --shape (default 1)")
    p.add_argument("--channels", type=int, default=1, help="synthetic only: input channels (default 1)")
    p.add_argument("--ignore-label", action="store_true", help="synthetic only: add an ignore label")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from .. import data
    from ..layout import dataset_id

    synthetic_only = {"--shape": args.shape, "--ignore-label": args.ignore_label, "--channels": args.channels != 1,
                      "--spacing": args.spacing}
    given = [flag for flag, value in synthetic_only.items() if value]
    if args.kind != "synthetic" and given:
        raise ValueError(f"{', '.join(given)} only apply to the synthetic kind, not {args.kind}; drop them")
    if args.layout == "nnunet" and args.test_cases:
        raise ValueError(f"--test-cases {args.test_cases} is for --layout msd (MSD's imagesTs); drop it or add --layout msd")
    out = args.o or args.raw or (os.environ.get("nnUNet_raw") if args.layout == "nnunet" else ".")
    if not out:
        raise ValueError("nnUNet_raw is not set: export it or pass -o FOLDER")

    def build(root: str, num_cases: int):
        common = dict(num_cases=num_cases, seed=args.seed, overwrite=args.overwrite)
        if args.id is not None:
            common["dataset_id"] = args.id
        if args.kind == "synthetic":
            return data.make_synthetic_dataset(root, shape=tuple(args.shape) if args.shape else (96, 96),
                                               ignore_label=args.ignore_label, channels=args.channels,
                                               spacing=args.spacing, **common)
        if args.kind == "ch2-deepgm":
            return data.make_ch2_deepgm_dataset(root, **common)
        return data.make_totalseg_abdomen_dataset(root, **common)

    if args.layout == "nnunet":
        folder = build(out, args.num_cases)
        print(f"wrote {folder}\nnext: nnUNetv2_plan_and_preprocess -d {dataset_id(folder.name)} --verify_dataset_integrity")
        return 0
    with tempfile.TemporaryDirectory(prefix="nnunet_mbls_msd_") as tmp:
        source = build(tmp, args.num_cases + args.test_cases)
        number, name = dataset_id(source.name), source.name.split("_", 1)[1]
        task = data.write_msd_task(source, out, number, name, args.test_cases, args.overwrite)
    print(f"wrote {task} ({args.num_cases} training, {args.test_cases} test cases)\n"
          f"next: nnUNetv2_convert_MSD_dataset -i {task} && nnUNetv2_plan_and_preprocess -d {number} "
          f"--verify_dataset_integrity")
    return 0
