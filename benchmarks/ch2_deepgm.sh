#!/usr/bin/env bash
# Stock nnU-Net vs MbLS on real MRI anatomy (Colin27 + AAL deep grey matter, Debian's mricron-data), 3d_fullres,
# on the CPU with a short schedule. The numbers in docs/BENCHMARKS.md ("ch2-deepgm") come from this script.
#
#   bash benchmarks/ch2_deepgm.sh [OUT] [EPOCHS] [ITERATIONS] [CASES]     (defaults: ./ch2_deepgm_run 30 20 20)
#
# Everything goes under OUT (nnU-Net's three folders, the benchmark table, logs); rerunning continues where it
# stopped (finished folds are skipped). The dataset is ONE subject augmented: its cases are not independent.
set -euo pipefail
OUT=$(realpath -m "${1:-ch2_deepgm_run}")
EPOCHS=${2:-30}
ITERATIONS=${3:-20}
CASES=${4:-20}
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
export nnUNet_def_n_proc=1 nnUNet_compile=f
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"

[ -d "$nnUNet_raw/Dataset991_MbLSCh2DeepGM" ] || nnunet-mbls dataset ch2-deepgm -n "$CASES" --seed 0
[ -f "$nnUNet_preprocessed/Dataset991_MbLSCh2DeepGM/nnUNetPlans.json" ] || \
    nnUNetv2_plan_and_preprocess -d 991 -c 3d_fullres -np 1 -npfp 1 --verify_dataset_integrity
# training runs in the benchmark process: no data-augmentation workers on a 2-core machine
nnUNet_n_proc_DA=0 nnunet-mbls benchmark -d 991 -c 3d_fullres -f 0 -tr nnUNetTrainer nnUNetTrainerMbLS \
    --train --epochs "$EPOCHS" --iterations "$ITERATIONS" -device cpu -o "$OUT/benchmark"
