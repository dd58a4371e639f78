"""How much do nnU-Net's distorted image-border probabilities move the temperature fit?

nnU-Net accumulates sliding-window logits in fp16 with a Gaussian weight that is tiny at the image
border, which distorts border probabilities whatever the model (see DESIGN.md). This script refits
the temperature of a finished fold with and without a band of ``--band`` voxels along the image
border and prints both, with the mean confidence in and out of the band.

    python benchmarks/border_effect.py $nnUNet_results/Dataset990_MbLSSynthetic/nnUNetTrainer__nnUNetPlans__2d/fold_0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nnunet_mbls.calibration.folds import gt_folder_for
from nnunet_mbls.defaults import T_BOUNDS
from nnunet_mbls.calibration.temperature import fit_temperature
from nnunet_mbls.calibration.evaluation import LabelInfo, load_probabilities, match_cases, reader_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_folder", type=Path)
    parser.add_argument("--band", type=int, default=6, help="border band width in voxels (default 6)")
    args = parser.parse_args()
    gt = gt_folder_for(args.fold_folder)
    dataset_json = json.loads((args.fold_folder.parent / "dataset.json").read_text())
    labels = LabelInfo.from_dataset_json(dataset_json)
    cases = match_cases(gt, args.fold_folder / "validation", chill=True)
    reader = reader_for(dataset_json, next(iter(cases.values()))[0])
    rows = {"all": ([], []), "without band": ([], [])}
    confidence = {"band": [], "interior": []}
    for case, (ref_file, npz) in cases.items():
        probs, _ = load_probabilities(case, npz)
        ref = reader.read_seg(str(ref_file))[0][0].astype(np.int64)
        interior = np.zeros(ref.shape, bool)
        interior[tuple(slice(args.band, s - args.band) if s > 2 * args.band else slice(None) for s in ref.shape)] = True
        keep = ref != labels.ignore_label if labels.ignore_label is not None else np.ones(ref.shape, bool)
        log_p = np.log(np.clip(probs, 1e-12, 1)).reshape(probs.shape[0], -1).T
        for name, mask in (("all", keep), ("without band", keep & interior)):
            rows[name][0].append(log_p[mask.ravel()])
            rows[name][1].append(ref.ravel()[mask.ravel()])
        conf = probs.max(0)
        confidence["band"].append(conf[~interior & keep].ravel())
        confidence["interior"].append(conf[interior & keep].ravel())
    n_band = sum(len(c) for c in confidence["band"])
    n_all = n_band + sum(len(c) for c in confidence["interior"])
    print(f"{args.fold_folder}: {len(cases)} cases, band of {args.band} voxels = {n_band / n_all:.1%} of the voxels")
    for name, (lp, t) in rows.items():
        T = fit_temperature(torch.from_numpy(np.concatenate(lp)), torch.from_numpy(np.concatenate(t)), t_bounds=T_BOUNDS)
        print(f"  T fitted on {name:<13} voxels: {T:.4f}")
    for name, values in confidence.items():
        print(f"  mean confidence, {name:<8}: {np.concatenate(values).mean():.4f}")


if __name__ == "__main__":
    main()
