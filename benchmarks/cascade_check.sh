#!/usr/bin/env bash
# The calibration step on both cascade stages (3d_lowres -> 3d_cascade_fullres), on a generated dataset for which
# nnU-Net 2.8.1 plans the cascade: too slow for the test suite on 2 CPU cores (~20 min), run by hand:
#   bash benchmarks/cascade_check.sh [WORKDIR]
# Prints each stage's fitted T and the checkpoint calibration.json names, compares nnunet-mbls predict --calibrated
# --maps on the cascade with nnUNetv2_predict, fits conformal rules on the cascade stage and shows the
# --calibration-set refusal.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d)}
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/pre nnUNet_results=$WORK/res nnUNet_compile=f nnUNet_def_n_proc=1
eval "$(nnunet-mbls env)"
export nnUNet_extTrainer=$nnUNet_extTrainer:$REPO/tests/ext_trainers
T=nnUNetTrainerMbLS_nomirror_test
nnunet-mbls dataset synthetic --id 508 -n 6 --shape 128 192 192 > /dev/null
nnUNetv2_extract_fingerprint -d 508 -np 1 > /dev/null
nnUNetv2_plan_experiment -d 508 -gpu_memory_target 1 > /dev/null   # plans 3d_lowres (1.6 mm) and 3d_cascade_fullres
nnUNetv2_preprocess -d 508 -c 3d_lowres 3d_fullres -np 1 1 > /dev/null
python - "$nnUNet_preprocessed" <<'PY'
import json, sys, glob
folder = glob.glob(f"{sys.argv[1]}/Dataset508_*")[0]
plans = json.load(open(f"{folder}/nnUNetPlans.json"))["configurations"]
assert plans["3d_lowres"]["next_stage"] == "3d_cascade_fullres", plans.keys()
cases = ["case_%04d" % i for i in range(6)]  # two folds of three cases
json.dump([{"train": cases[3:], "val": cases[:3]}, {"train": cases[:3], "val": cases[3:]}], open(f"{folder}/splits_final.json", "w"))
PY
export nnUNet_n_proc_DA=0
for fold in 0 1; do nnUNetv2_train 508 3d_lowres $fold -tr $T -device cpu > /dev/null; done  # every case's low-res prediction
nnUNetv2_train 508 3d_cascade_fullres 0 -tr $T -device cpu > /dev/null
for c in 3d_lowres 3d_cascade_fullres; do
  python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'T =', round(d['temperature'], 4), d['source_checkpoint']['file'])" \
    "$nnUNet_results"/Dataset508_*/${T}__nnUNetPlans__$c/fold_0/calibration.json $c
done
# nnunet-mbls predict on the cascade: its calibrated probability maps against nnUNetv2_predict's with the same
# calibrated checkpoint and the same low-res segmentations (-prev_stage_predictions), one case
mkdir -p "$WORK/in"
ln -sf "$nnUNet_raw"/Dataset508_*/imagesTr/case_0000_0000.nii.gz "$WORK/in/"
P="-d 508 -f 0 -tr $T -device cpu"
nnUNetv2_predict -i "$WORK/in" -o "$WORK/lowres" -c 3d_lowres $P -npp 0 -nps 0 > /dev/null
nnUNetv2_predict -i "$WORK/in" -o "$WORK/cascade_nnunet" -c 3d_cascade_fullres $P -chk checkpoint_final_calibrated.pth \
  -prev_stage_predictions "$WORK/lowres" --save_probabilities -npp 0 -nps 0 > /dev/null
nnunet-mbls predict -i "$WORK/in" -o "$WORK/cascade_ours" -c 3d_cascade_fullres $P --calibrated --maps probabilities \
  -prev_stage_predictions "$WORK/lowres" -npp 0 > /dev/null
python - "$WORK" <<'PY'
import sys, numpy as np, SimpleITK as sitk
work = sys.argv[1]
p = np.load(f"{work}/cascade_nnunet/case_0000.npz")["probabilities"]
seg = lambda f: sitk.GetArrayFromImage(sitk.ReadImage(f))
same = (seg(f"{work}/cascade_nnunet/case_0000.nii.gz") == seg(f"{work}/cascade_ours/case_0000.nii.gz")).mean()
diff = max(np.abs(seg(f"{work}/cascade_ours/maps/case_0000_prob_{n}.nii.gz") - p[k]).max()
           for k, n in ((1, "outer"), (2, "inner"), (3, "adjacent")))
print(f"cascade predict --calibrated --maps vs nnUNetv2_predict: segmentation agreement {same:.6f}, max |dp| {diff:.2e}")
PY
# conformal rules on the cascade's out-of-fold cases (after its temperature); --calibration-set is refused there
nnunet-mbls conformal -d 508 -c 3d_cascade_fullres -f 0 -tr $T --alpha 0.5 -device cpu -o "$WORK/conformal_cascade.json" \
  2> /dev/null | grep -v "it/s" | tail -5
mkdir -p "$WORK/labels" && ln -sf "$nnUNet_raw"/Dataset508_*/labelsTr/case_0000.nii.gz "$WORK/labels/"
nnunet-mbls calibrate -d 508 -c 3d_cascade_fullres -f 0 -tr $T --calibration-set "$WORK/in" "$WORK/labels" -device cpu \
  2>&1 | tail -1 || true
# the benchmark table of the cascade stage
nnunet-mbls benchmark -d 508 -c 3d_cascade_fullres -f 0 -tr $T --baseline $T --collect -o "$WORK/bench" | sed -n '/As trained/,/^$/p;/As trained/,+4p' | head -6
