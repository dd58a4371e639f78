#!/usr/bin/env bash
# `nnunet-mbls benchmark --collect` reading streamed statistics against the .npz route of nnunet-mbls <= 0.2, on the
# same trained folds: the demo dataset (40 synthetic 2D cases of 96x96), all five folds x {stock, MbLS}, a short
# schedule (the collect time does not depend on it). Every fold keeps nnU-Net's .npz (--npz) AND has streamed
# statistics (its calibration step was run with the .npz moved aside, so it validated streaming), so both routes
# read the same folds. The old route runs from a git worktree of OLD_COMMIT with its own editable install.
#   bash benchmarks/bench_collect.sh [OUT (default /tmp/collect)] [OLD_COMMIT (default f9c3c19, before issue 19)]
#   phases: OUT/prepared marks the trained folds; timings: median of 3 runs per route, printed and in OUT/timings.txt
set -euo pipefail
OUT=${1:-/tmp/collect}
OLD=${2:-f9c3c19}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
export nnUNet_raw=$OUT/raw nnUNet_preprocessed=$OUT/pre nnUNet_results=$OUT/res nnUNet_compile=f nnUNet_def_n_proc=1
eval "$(nnunet-mbls env)"
TRAINERS="nnUNetTrainerDemo_stock nnUNetTrainerDemo_mbls"
export nnUNet_extTrainer="$nnUNet_extTrainer:$OUT/trainers"
if [ ! -f "$OUT/prepared" ]; then
    mkdir -p "$OUT/trainers"
    cat > "$OUT/trainers/collect_bench_trainers.py" <<'EOF'
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_mbls.trainers.variants import nnUNetTrainerMbLS


class nnUNetTrainerDemo_stock(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 5, 10, 5


class nnUNetTrainerDemo_mbls(nnUNetTrainerMbLS):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 5, 10, 5
EOF
    [ -d "$nnUNet_raw/Dataset990_MbLSSynthetic" ] || nnunet-mbls dataset synthetic -o "$nnUNet_raw" -n 40 --shape 96 96 --seed 0
    [ -d "$nnUNet_preprocessed/Dataset990_MbLSSynthetic/nnUNetPlans_2d" ] || \
        nnUNetv2_plan_and_preprocess -d 990 -c 2d -np 1 -npfp 1 > "$OUT/plan.log"
    for tr in $TRAINERS; do
        for f in 0 1 2 3 4; do
            fold=$nnUNet_results/Dataset990_MbLSSynthetic/${tr}__nnUNetPlans__2d/fold_$f
            [ -f "$fold/checkpoint_final.pth" ] || nnUNet_n_proc_DA=0 nnUNetv2_train 990 2d $f -tr $tr -device cpu --npz > "$OUT/train_${tr}_$f.log" 2>&1
            # the calibration step with the .npz moved aside: nnunet-mbls calibrate validates, streaming the statistics
            mkdir -p "$fold/npz_aside" && mv "$fold"/validation/*.npz "$fold"/validation/*.pkl "$fold/npz_aside/" 2>/dev/null || true
            nnunet-mbls calibrate -d 990 -c 2d -f $f -tr $tr -device cpu > "$OUT/calibrate_${tr}_$f.log" 2>&1
            mv "$fold"/npz_aside/* "$fold/validation/" && rmdir "$fold/npz_aside"
        done
    done
    touch "$OUT/prepared"
fi
# the old code: a worktree of OLD put first on PYTHONPATH, with this environment's packages
[ -d "$OUT/old" ] || git -C "$REPO" worktree add -f "$OUT/old" "$OLD" > /dev/null
ARGS="benchmark -d 990 -c 2d -f 0 1 2 3 4 -tr $TRAINERS --baseline nnUNetTrainerDemo_stock --collect"
python3 - "$OUT" "$ARGS" <<'EOF' | tee "$OUT/timings.txt"
import os, statistics, subprocess, sys, time
out, args = sys.argv[1], sys.argv[2].split()
routes = {"old (.npz)": dict(os.environ, PYTHONPATH=os.path.join(out, "old")), "new (statistics)": dict(os.environ)}
times = {route: [] for route in routes}
for _ in range(3):  # interleaved
    for route, env in routes.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from nnunet_mbls.cli import main; main()", *args, "-o",
                        os.path.join(out, "bench_" + route.split()[0])], env=env, check=True, capture_output=True)
        times[route].append(time.perf_counter() - start)
old, new = (statistics.median(times[r]) for r in routes)
print(f"benchmark --collect, demo dataset, 5 folds x 2 trainers, median of 3 runs: old (.npz) {old:.1f} s, "
      f"new (statistics) {new:.1f} s, speed-up {old / new:.1f}x; runs: {times}")
EOF
