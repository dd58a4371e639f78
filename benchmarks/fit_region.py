"""Which voxels should the temperature be fitted on: all voxels in nnU-Net's crop box, or the foreground?

For every (trainer, fold) of trained, validated folds (their ``validation/*.npz`` kept): fit T per fold with
``--fit-region all`` and with ``--fit-region fg`` (the calibration step's own code), then score the
validation cases with each T on the foreground (the paper's headline region) and on all crop-box voxels (what
the user sees). Reports the mean over all cases of each fold (and the T's); nothing is written into the folds.

    python benchmarks/fit_region.py -d 990 -c 2d -f 0 1 2 3 4 -tr nnUNetTrainer nnUNetTrainerMbLS \\
        [--out DIR]       # with nnU-Net's path variables of the trained benchmark set
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, markdown_table, save_json  # noqa: E402

METRICS = ("ece", "ece_adaptive", "nll", "brier")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-f", nargs="+", required=True)
    parser.add_argument("-tr", nargs="+", required=True)
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("--out", help="folder for fit_region.json")
    args = parser.parse_args(argv)

    from nnunet_mbls.benchmark.grid import Cell, dataset_name
    from nnunet_mbls.calibration.folds import fit_temperature_on, gt_folder_for, plans_of
    from nnunet_mbls.defaults import MAX_VOXELS as DEFAULT_MAX_VOXELS
    from nnunet_mbls.calibration.evaluation import evaluate_folder

    dataset = dataset_name(args.d)
    results: dict = {}
    rows = []
    for trainer in args.tr:
        per_case = {fit: {region: [] for region in ("fg", "all")} for fit in ("all", "fg")}
        temperatures = {"all": [], "fg": []}
        for fold in args.f:
            folder = Cell(dataset, args.c, str(fold), trainer, args.p).folder
            dataset_json = json.loads((folder.parent / "dataset.json").read_text())
            gt, plans = gt_folder_for(folder), plans_of(folder.parent)
            for fit_region in ("all", "fg"):
                fit = fit_temperature_on(gt, [folder / "validation"], dataset_json, plans, "fg", fit_region,
                                         DEFAULT_MAX_VOXELS, 0, progress=False)
                temperatures[fit_region].append(fit.temperature)
                per_case[fit_region]["fg"] += list(fit.after["per_case"].values())
                scored_all = evaluate_folder(gt, folder / "validation", dataset_json, region="all",
                                             temperature=fit.temperature, chill=True, plans=plans, progress=False)
                per_case[fit_region]["all"] += list(scored_all["per_case"].values())
        results[trainer] = {"temperatures": temperatures}
        for fit_region in ("all", "fg"):
            for region in ("fg", "all"):
                cases = per_case[fit_region][region]
                means = {m: float(np.nanmean([c[m] for c in cases])) for m in METRICS}
                results[trainer][f"fit_{fit_region}__scored_{region}"] = {**means, "n_cases": len(cases)}
                rows.append([trainer, fit_region, f"{np.mean(temperatures[fit_region]):.3f}", region,
                             *(f"{means[m]:.4f}" for m in METRICS), len(cases)])
    print(markdown_table(["trainer", "T fitted on", "mean T", "scored on", *METRICS, "cases"], rows))
    payload = {"machine": machine_info(), "command": " ".join(sys.argv), "dataset": dataset, "results": results}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_json(str(Path(args.out) / "fit_region.json"), payload)
    return payload


if __name__ == "__main__":
    main()
