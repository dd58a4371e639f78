"""Training iteration time of nnunet-mbls trainers against stock ``nnUNetTrainer`` on the same data.

Builds a small synthetic dataset (3D, or 2D with ``--configuration 2d``) in a temporary nnU-Net folder,
runs nnU-Net's own ``nnUNetv2_plan_and_preprocess -c CONFIGURATION``, then, in this process and on the CPU,
builds every
trainer with ``get_trainer_from_args``, initialises it, gives it the stock trainer's initial network
weights, and times ``train_step`` (forward, deep-supervision loss, backward, gradient clipping, SGD
step) on the same fixed batches: N batches are fetched once from the stock trainer's training data
loader and reused by every trainer. Trainers alternate within each round (order rotated per round) so
drift from other jobs hits all alike; the ratio is the median over rounds of t(trainer) / t(stock)
within the round (wall time, and CPU time of this process). The same is done for ``validation_step``
(forward and loss without gradients; our trainers also collect the batch's foreground-ECE statistics
there), on the same batches.

    python benchmarks/bench_trainer.py [--iterations 8] [--json OUT]
    python benchmarks/bench_trainer.py --configuration 2d --shape 96 96 --cases 16
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_average, machine_info, markdown_table, paired_rounds, save_json, set_threads  # noqa: E402

STOCK = "nnUNetTrainer"


def set_nnunet_env(root: Path) -> dict[str, str]:
    """nnU-Net folders under ``root``, single-process CPU settings, and our trainers on the lookup path.

    Must run before nnunetv2 is imported: nnunetv2.paths reads the variables at import time.
    """
    from nnunet_mbls.paths import env_with_ext_trainers

    env = env_with_ext_trainers(dict(
        os.environ,
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_def_n_proc="1",
        nnUNet_compile="f",
    ))
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


def plan_and_preprocess(dataset_id: int, env: dict[str, str]) -> float:
    from nnunet_mbls.data.synthetic import make_synthetic_dataset

    t0 = time.perf_counter()
    make_synthetic_dataset(env["nnUNet_raw"], dataset_id=dataset_id, name="BenchTrainer", num_cases=ARGS.cases,
                           shape=tuple(ARGS.shape), seed=0)
    command = [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
               "-c", ARGS.configuration, "-np", "1", "-npfp", "1"]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def build_trainers(dataset_id: int, names: list[str]):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ["nnUNet_n_proc_DA"] = "0"  # training only (0 crashes plan_and_preprocess)
    trainers = {}
    for name in names:
        trainer = get_trainer_from_args(str(dataset_id), ARGS.configuration, 0, name, device=torch.device("cpu"))
        trainer.initialize()
        trainers[name] = trainer
    reference = trainers[names[0]].network.state_dict()
    for trainer in trainers.values():
        trainer.network.load_state_dict(reference)
        trainer.network.train()
    return trainers


def fetch_batches(trainer, n: int) -> list[dict]:
    loader, _ = trainer.get_dataloaders()
    return [next(loader) for _ in range(n)]


def stepper(trainer, kind: str, batches: list[dict]):
    """A call that runs ``trainer.train_step`` or ``trainer.validation_step`` on the next batch (cycling);
    validation under ``torch.no_grad()``, as nnU-Net's ``run_training`` calls it."""
    import torch

    cycle = itertools.cycle(batches)
    if kind == "train_step":
        return lambda: trainer.train_step(next(cycle))

    def validate():
        with torch.no_grad():
            return trainer.validation_step(next(cycle))

    return validate


def main(argv: list[str] | None = None) -> list[dict]:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainerMbLS"],
                        help=f"trainers to compare with {STOCK}")
    parser.add_argument("--iterations", type=int, default=8, help="timed rounds (each trainer one step per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer first")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches fetched once and reused")
    parser.add_argument("--configuration", default="3d_fullres", choices=["3d_fullres", "2d"])
    parser.add_argument("--shape", type=int, nargs="+", default=[48, 64, 64],
                        help="synthetic case shape: z y x, or y x for a 2D dataset (default 48 64 64)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--dataset-id", type=int, default=987)
    parser.add_argument("--workdir", help="nnU-Net root folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    parser.add_argument("--json", metavar="OUT", help="write the raw numbers to this JSON file")
    ARGS = parser.parse_args(argv)
    set_threads(ARGS.threads)

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        root = Path(ARGS.workdir or tmp)
        env = set_nnunet_env(root)
        plan_s = plan_and_preprocess(ARGS.dataset_id, env)
        import torch

        info = machine_info()
        print(f"machine: {info}\nplan_and_preprocess: {plan_s:.1f} s", flush=True)
        names = [STOCK] + ARGS.trainers
        trainers = build_trainers(ARGS.dataset_id, names)
        batches = fetch_batches(trainers[STOCK], ARGS.batches)
        patch = tuple(batches[0]["data"].shape)
        scales = [tuple(t.shape[2:]) for t in batches[0]["target"]]
        print(f"batch data shape {patch}, deep-supervision targets {scales}")
        for name in names:
            for i in range(ARGS.warmup):
                trainers[name].train_step(batches[i % len(batches)])
        device = torch.device("cpu")
        rows = []
        for kind in ("train_step", "validation_step"):
            steps = {name: stepper(trainers[name], kind, batches) for name in names}  # round r: batch r % len
            timing = paired_rounds(steps, STOCK, ARGS.iterations, device)
            rows += [{"step": kind, "trainer": name, **timing[name]} for name in names]
        info["loadavg_end"] = load_average()
        print(f"\n### {ARGS.configuration}, batch {patch}, CPU ({torch.get_num_threads()} threads), "
              f"{ARGS.iterations} rounds, load average {info['loadavg']} -> {info['loadavg_end']}\n")
        print(markdown_table(["step", "trainer", "median (s)", "time / stock (median of rounds)",
                              "fastest / fastest stock", "CPU time / stock (median)"],
                             [[r["step"], r["trainer"], r["wall_median_s"], r["wall_ratio"], r["wall_min_ratio"],
                               r["cpu_ratio"]] for r in rows]))
        save_json(ARGS.json, {"machine": info, "args": vars(ARGS), "patch": patch, "plan_s": plan_s, "rows": rows})
    return rows


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
