#!/usr/bin/env bash
# The demo dataset (40 synthetic 2D cases, seed 0) trained on all five folds of nnU-Net's split for stock
# nnU-Net and MbLS with the demo's schedule (50 epochs x 20 iterations, CPU), then tabulated: the run behind
# docs/BENCHMARKS.md's failure-detection section. Resumable: run it again to continue.
#   bash benchmarks/demo_five_folds.sh [OUT (default /tmp/demo5)] [extra trainers ...]
set -euo pipefail
OUT=${1:-/tmp/demo5}
shift || true
export nnUNet_raw=$OUT/nnUNet_raw nnUNet_preprocessed=$OUT/nnUNet_preprocessed nnUNet_results=$OUT/nnUNet_results
export nnUNet_def_n_proc=1 nnUNet_compile=f
eval "$(nnunet-mbls env)"
[ -d "$nnUNet_raw/Dataset990_MbLSSynthetic" ] || nnunet-mbls dataset synthetic -o "$nnUNet_raw" -n 40 --shape 96 96 --seed 0
[ -d "$nnUNet_preprocessed/Dataset990_MbLSSynthetic/nnUNetPlans_2d" ] || \
    nnUNetv2_plan_and_preprocess -d 990 -c 2d -np 1 -npfp 1 --verify_dataset_integrity > "$OUT/plan.log"
nnUNet_n_proc_DA=0 nnunet-mbls benchmark -d 990 -c 2d -f 0 1 2 3 4 -tr nnUNetTrainer nnUNetTrainerMbLS "$@" \
    --train --vector-scaling --epochs 50 --iterations 20 -device cpu -o "$OUT/benchmark"
# which voxels to fit T on (docs/BENCHMARKS.md)
python "$(dirname "$0")/fit_region.py" -d 990 -c 2d -f 0 1 2 3 4 -tr nnUNetTrainer nnUNetTrainerMbLS --out "$OUT/fit_region"
