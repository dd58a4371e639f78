"""The options several commands share, each declared once, and the helpers that read them.

Flags keep their spelling: nnU-Net's own flags keep nnU-Net's (``-d``, ``-step_size``, ``--disable_tta``,
``-device``), ours keep ours. Light to import: ``--help`` builds every parser.
"""

from __future__ import annotations

import argparse

from ..defaults import METRIC_REGION, REGIONS

#: the stock trainer and plans of nnU-Net, the defaults of -tr and -p
STOCK_TRAINER = "nnUNetTrainer"
STOCK_PLANS = "nnUNetPlans"
#: nnU-Net predictor's default sliding-window step (a fraction of the patch)
STEP_SIZE = 0.5


def add_model_options(p: argparse.ArgumentParser, *, folds_help: str, trainer_help: str,
                      several_datasets: bool = False, default_folds: list[str] | None = None,
                      several_trainers: bool = False, configurations_help: str | None = None) -> None:
    """nnU-Net's ``-d -c -f -tr -p``: one dataset (or several), one configuration (or several, with
    ``configurations_help``), folds required unless ``default_folds``, one trainer defaulting to stock nnU-Net (or
    several, required)."""
    if several_datasets:
        p.add_argument("-d", nargs="+", required=True, help="dataset names or ids")
    else:
        p.add_argument("-d", required=True, help="dataset name or id")
    if configurations_help:
        p.add_argument("-c", nargs="+", required=True, help=configurations_help)
    else:
        p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", required=default_folds is None, default=default_folds, help=folds_help)
    if several_trainers:
        p.add_argument("-tr", nargs="+", required=True, help=trainer_help)
    else:
        p.add_argument("-tr", default=STOCK_TRAINER, help=trainer_help)
    p.add_argument("-p", default=STOCK_PLANS, help=f"plans identifier (default {STOCK_PLANS})")


def add_device_option(p: argparse.ArgumentParser, help: str = "cuda or cpu (default: cuda if available)") -> None:
    """``-device``, None in the parser: ``main`` resolves it with ``default_device`` (``--help`` imports no torch)."""
    p.add_argument("-device", default=None, help=help)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_num_processes_option(p: argparse.ArgumentParser, cases: str = "cases") -> None:
    """``-np``: worker processes over the ``cases`` of a folder evaluation."""
    p.add_argument("-np", type=int, default=None,
                   help=f"worker processes over the {cases} (default: nnU-Net's default_num_processes, i.e. "
                        "nnUNet_def_n_proc or 8, at most one per case and per CPU; 1 for folders under 512 MiB of "
                        ".npz; 1 = in this process); the result is the same for any value")


def add_region_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--region``: the voxels the reported calibration metrics are computed on."""
    p.add_argument("--region", choices=list(REGIONS), default=METRIC_REGION, help=help)


def add_sliding_window_options(p: argparse.ArgumentParser, step_help: str, tta_help: str) -> None:
    """nnU-Net predictor's ``-step_size`` and ``--disable_tta``."""
    p.add_argument("-step_size", type=float, default=STEP_SIZE, help=step_help)
    p.add_argument("--disable_tta", action="store_true", help=tta_help)


def add_temperature_options(p: argparse.ArgumentParser, *, required: bool, t_help: str) -> None:
    """``-t T`` or ``--calibration-json FILE``, one of them."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("-t", type=float, help=t_help)
    group.add_argument("--calibration-json", help="take T from a calibration.json written by calibrate")


def add_map_and_flag_options(p: argparse.ArgumentParser, default_maps) -> None:
    """``--maps``, ``--maps-dtype`` and the QC flag rule (``--flag-score``, ``--flag-threshold``)."""
    from ..inference import MAP_KINDS, SCORE_DIRECTION

    p.add_argument("--maps", nargs="+", choices=MAP_KINDS, default=default_maps, metavar="KIND",
                   help=f"maps to write into OUT/maps/ as NIfTI in the input geometry: {', '.join(MAP_KINDS)}")
    p.add_argument("--maps-dtype", choices=["float32", "uint8"], default="float32",
                   help="uint8 stores probabilities and confidence as 0..255 with NIfTI scale slope 1/255 (4x smaller)")
    p.add_argument("--flag-score", choices=list(SCORE_DIRECTION),
                   help="QC score of the flag rule (default: mean_fold_dice < 0.8 with >= 2 folds, else mean_entropy_fg > 0.3)")
    p.add_argument("--flag-threshold", type=float, help="threshold of --flag-score (entropies: flag above; Dice: flag below)")
    p.add_argument("--conformal-json", help="a conformal.json of nnunet-mbls conformal: write its masks into maps/, its volume "
                                            "intervals into qc.csv, and flag with its acceptance rule")


def flag_rule_from(args: argparse.Namespace):
    """The ``FlagRule`` of ``--flag-score``/``--flag-threshold``, or None for the default rule."""
    from ..inference.qc import FlagRule

    if args.flag_score is None and args.flag_threshold is None:
        return None
    if args.flag_score is None or args.flag_threshold is None:
        raise ValueError("pass --flag-score and --flag-threshold together (e.g. --flag-score mean_fold_dice --flag-threshold 0.8)")
    return FlagRule(args.flag_score, args.flag_threshold)


def print_qc_summary(qc_csv) -> None:
    """The QC table written by predict or maps, in a few lines: flagged cases and the files written."""
    import json

    summary = json.loads(qc_csv.with_suffix(".json").read_text())
    print(f"{len(summary['cases'])} cases, {summary['num_flagged']} flagged ({summary['flag_rule']})")
    for case, row in summary["cases"].items():
        if row["flag"]:
            print(f"  flagged: {case}")
    print(f"wrote {qc_csv} and {qc_csv.with_suffix('.json')}" + (f"; maps in {qc_csv.parent / 'maps'}"
                                                                   if summary["settings"]["maps"] else ""))
