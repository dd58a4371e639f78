#!/usr/bin/env bash
# Stock nnU-Net vs MbLS and Dice+CE+margin on real MRI anatomy (Colin27 + AAL deep grey matter, Debian's mricron-data) on the CPU
# with a short schedule. The numbers in docs/BENCHMARKS.md ("ch2-deepgm") come from this script.
#
#   bash benchmarks/ch2_deepgm.sh [OUT] [CONFIGURATION] [EPOCHS] [ITERATIONS] [CASES]
#   (defaults: ./ch2_deepgm_run 2d 50 20 20)
#
# Everything goes under OUT (nnU-Net's three folders, the benchmark table, logs); rerunning continues where it
# stopped (finished folds are skipped). The dataset is ONE subject augmented: its cases are not independent.
set -euo pipefail
OUT=$(realpath -m "${1:-ch2_deepgm_run}")
CONFIGURATION=${2:-2d}
EPOCHS=${3:-50}
ITERATIONS=${4:-20}
CASES=${5:-20}
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
export nnUNet_def_n_proc=1 nnUNet_compile=f
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"

[ -d "$nnUNet_raw/Dataset991_MbLSCh2DeepGM" ] || nnunet-mbls dataset ch2-deepgm -n "$CASES" --seed 0
[ -d "$nnUNet_preprocessed/Dataset991_MbLSCh2DeepGM/nnUNetPlans_$CONFIGURATION" ] || \
    nnUNetv2_plan_and_preprocess -d 991 -c "$CONFIGURATION" -np 1 -npfp 1 --verify_dataset_integrity
# training runs in the benchmark process: no data-augmentation workers on a 2-core machine
nnUNet_n_proc_DA=0 nnunet-mbls benchmark -d 991 -c "$CONFIGURATION" -f 0 -tr nnUNetTrainer nnUNetTrainerMbLS nnUNetTrainerMbLSDice \
    --train --epochs "$EPOCHS" --iterations "$ITERATIONS" -device cpu -o "$OUT/benchmark"
