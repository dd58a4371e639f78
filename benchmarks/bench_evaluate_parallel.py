"""Folder evaluation over cases in worker processes: ``evaluate_folder(..., num_processes=N)`` against serial.

Data: a generated folder of 3D cases (``_eval_cases.py``: ``--cases`` cases of ``--shape``, 4 classes, nested
ellipsoids with jittered boundaries, probabilities = softmax of smooth noisy logits, ``.npz`` written with
``np.savez_compressed`` as nnU-Net does, references as ``.nii.gz``). Each round times, in this process, once
each (order rotated per round, so drift from other jobs hits all alike):

* ``evaluate_folder np=n``: ``evaluate_folder(ref, pred, progress=False, num_processes=n)`` for every n of
  ``--np``; for n > 1 the call starts its 'spawn' workers (each imports torch, nnU-Net's reader and metrics and
  MONAI) and stops them, as one ``nnunet-mbls evaluate -np n`` does;
* ``evaluate_folder np=n, warm pool``: the same with the workers started before the call (what the calibration
  step's second pass and an ensemble's later folds get from a shared pool, see ``evaluation.case_workers``):
  the throughput once start-up is paid;
* ``start_case_workers(n) alone``: starting n workers and waiting until each has imported its modules;
* ``calibrate_output_folder np=n`` (``--calibrate``): the calibration step on the same cases laid out as a
  trained fold (two passes sharing one pool, and the fit).

Reported: median wall time and the median over rounds of the within-round ratio t(np=1) / t (the speed-up).
Every result is checked to be identical to the np=1 one (same JSON, temperature included).

    python benchmarks/bench_evaluate_parallel.py [--cases 8] [--shape 64 128 128] [--np 1 2] [--rounds 3]
                                                 [--calibrate] [--no-warm] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_average, machine_info, markdown_table, median, save_json  # noqa: E402
from _eval_cases import make_eval_folder  # noqa: E402

from nnunet_mbls.calibration.evaluation import evaluate_folder  # noqa: E402

try:
    from nnunet_mbls.calibration.evaluation import start_case_workers  # noqa: E402
except ImportError:  # before worker processes existed: serial rows only
    start_case_workers = None


def as_fold(root: Path, ref: Path, pred: Path) -> Path:
    """Lay the generated cases out as a trained fold (as nnU-Net writes it) for calibrate_output_folder."""
    dataset = "Dataset778_Bench"
    gt = root / "preprocessed" / dataset / "gt_segmentations"
    shutil.copytree(ref, gt)
    cases = sorted(p.name[: -len(".npz")] for p in pred.glob("*.npz"))
    (gt.parent / "splits_final.json").write_text(json.dumps([{"train": [], "val": cases}]))
    fold = root / "results" / dataset / "Tr__nnUNetPlans__3d_fullres" / "fold_0"
    shutil.copytree(pred, fold / "validation")
    shutil.copy(ref.parent / "dataset.json", fold.parent / "dataset.json")
    (fold.parent / "plans.json").write_text(json.dumps({"transpose_forward": [0, 1, 2]}))
    return fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 128, 128])
    parser.add_argument("--np", type=int, nargs="+", default=[1, 2], help="numbers of processes (1 = serial)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibrate", action="store_true", help="also time calibrate_output_folder")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="skip the rows with a pool started before the call")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    parallel = "num_processes" in inspect.signature(evaluate_folder).parameters
    args.warm = args.warm and parallel
    nps = args.np if parallel else [1]
    if not parallel:
        print("evaluate_folder has no num_processes: timing the serial evaluation only")
    print(f"machine: {machine_info()}")

    with tempfile.TemporaryDirectory(prefix="bench_eval_parallel_") as tmp, contextlib.ExitStack() as pools:
        t0 = time.perf_counter()
        ref, pred = make_eval_folder(Path(tmp) / "data", args.cases, tuple(args.shape))
        size = sum(f.stat().st_size for f in pred.glob("*.npz")) / 2**20
        print(f"generated {args.cases} cases of {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s "
              f"({size:.0f} MiB of .npz)", flush=True)
        # what -> (function, the serial what it is compared with)
        steps = {f"evaluate_folder np={n}": (lambda n=n: evaluate_folder(
            ref, pred, progress=False, **({"num_processes": n} if parallel else {})), "evaluate_folder np=1")
            for n in nps}
        for n in (n for n in nps if n > 1 and args.warm):
            pool = start_case_workers(n)
            pools.callback(pool.terminate)
            steps[f"evaluate_folder np={n}, warm pool"] = (lambda pool=pool, n=n: in_pool(pool, lambda: evaluate_folder(
                ref, pred, progress=False, num_processes=n)), "evaluate_folder np=1")
        if args.calibrate:
            from nnunet_mbls.calibration.folds import calibrate_output_folder

            fold = as_fold(Path(tmp), ref, pred)
            os.environ["nnUNet_preprocessed"] = str(Path(tmp) / "preprocessed")
            import nnunetv2.paths

            nnunetv2.paths.nnUNet_preprocessed = os.environ["nnUNet_preprocessed"]  # read at import time
            for n in nps:
                steps[f"calibrate_output_folder np={n}"] = (lambda n=n: calibrate_output_folder(
                    fold, progress=False, log=lambda *a: None, write_checkpoint=False,
                    **({"num_processes": n} if parallel else {})), "calibrate_output_folder np=1")
        steps["evaluate_folder np=1"][0]()  # untimed: this process's one-off imports (MONAI, nnU-Net's metrics)
        cores = {"before": {n: cores_available(n) for n in nps if n > 1}}
        print(f"cores available to n concurrent processes: {cores['before']}", flush=True)
        times: dict = {key: [] for key in steps}
        startup: dict = {n: [] for n in nps if n > 1 and parallel}
        outputs: dict = {}
        names = list(steps)
        for r in range(args.rounds):
            for key in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                out = steps[key][0]()
                times[key].append(time.perf_counter() - start)
                outputs.setdefault(key, json.dumps(out, sort_keys=True, default=str))
                print(f"round {r}: {key}: {times[key][-1]:.2f} s", flush=True)
            for n in startup:
                start = time.perf_counter()
                pool = start_case_workers(n)
                startup[n].append(time.perf_counter() - start)
                pool.terminate()
                pool.join()
                print(f"round {r}: starting {n} workers: {startup[n][-1]:.2f} s", flush=True)
        rows = []
        for key in names:
            base = steps[key][1]
            ratios = [a / b for a, b in zip(times[base], times[key])]
            rows.append([key, median(times[key]), min(times[key]), median(ratios),
                         "yes" if outputs[key] == outputs[base] else "NO"])
        rows += [[f"start_case_workers({n}) alone", median(t), min(t), float("nan"), "–"] for n, t in startup.items()]
        cores["after"] = {n: cores_available(n) for n in nps if n > 1}
    print(f"\n{args.cases} cases of {tuple(args.shape)}, 4 classes, {size:.0f} MiB of .npz; {args.rounds} rounds; "
          f"load average now {load_average()}; 'warm pool': workers started before the call (as in the calibration "
          f"step's second pass), else the call starts and stops them; CPU cores available to n concurrent processes "
          f"(the ceiling of the speed-up) before / after the rounds: {cores['before']} / {cores['after']}")
    print(markdown_table(["what", "median s", "min s", "speed-up vs np=1 (median of rounds)", "result identical to np=1"],
                         rows))
    save_json(args.json, {"machine": machine_info(), "args": vars(args), "npz_mib": size, "times": times, "cores": cores,
                          "startup": {str(n): t for n, t in startup.items()}})
    if any(row[-1] == "NO" for row in rows):
        sys.exit("a parallel result differs from the serial one")


def _spin(barrier) -> tuple[float, float]:
    barrier.wait()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    x = 0
    for i in range(3_000_000):
        x += i * i
    return time.perf_counter() - wall0, time.process_time() - cpu0


def cores_available(n: int) -> float:
    """CPU cores that n concurrent processes of pure-Python work got just now: sum of their CPU times over the
    longest wall time (n on an idle machine with >= n cores; less when other jobs hold the cores). The ceiling
    of any speed-up from n worker processes at that moment."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(n)
    with context.Pool(n) as pool:
        runs = pool.map(_spin, [barrier] * n, chunksize=1)
    return sum(cpu for _, cpu in runs) / max(wall for wall, _ in runs)


def in_pool(pool, fn):
    """Run fn with ``pool`` as the shared worker pool of nnunet_mbls.calibration.evaluation (what a case_workers() block holds
    once its first call has started the workers)."""
    from nnunet_mbls.calibration.evaluation import workers

    workers._SHARED_WORKERS.append({"pool": pool})
    try:
        return fn()
    finally:
        workers._SHARED_WORKERS.pop()


if __name__ == "__main__":
    main()
