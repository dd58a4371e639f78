"""``nnunet-mbls benchmark``: the paper-style table of trained models against stock nnU-Net (or its cluster jobs)."""

from __future__ import annotations

import argparse

from .options import STOCK_TRAINER, add_device_option, add_model_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="paper-style table (Dice, HD95, ECE, CECE, NLL, Brier) of trained models vs stock nnU-Net")
    add_model_options(p, several_datasets=True, folds_help="folds, e.g. 0 1 2 3 4", several_trainers=True,
                      trainer_help="trainers, e.g. nnUNetTrainer nnUNetTrainerMbLS nnUNetTrainerLS")
    p.add_argument("--baseline", default=STOCK_TRAINER,
                   help=f"trainer the paired differences refer to (default {STOCK_TRAINER})")
    p.add_argument("--train", action="store_true", help="train unfinished folds here (interrupted ones continue)")
    p.add_argument("--collect", action="store_true", help="only build the table from finished folds; list missing ones")
    p.add_argument("--vector-scaling", action="store_true",
                   help="add rows for vector scaling shared by each trainer's folds (one more inference pass over the "
                        "validation cases per fold; measured only, nothing is written into the folds)")
    p.add_argument("--conformal", nargs="?", type=float, const=0.1, default=None, metavar="ALPHA",
                   help="measure the conformal guarantees (nnunet-mbls conformal) per trainer, as trained and after T: "
                        "mask sizes, volume-interval widths, accepted fraction at level ALPHA (default 0.1; one more "
                        "validation pass per fold and stage)")
    p.add_argument("--epochs", type=int, help="override the trainers' number of epochs (short schedules; default: the trainer's)")
    p.add_argument("--iterations", type=int, help="override the iterations per epoch (default: the trainer's)")
    add_device_option(p, "device for training and validation (default: cuda if available, else cpu)")
    p.add_argument("-o", default="benchmark", help="output folder (default ./benchmark): <o>/<dataset>/results.md ...")
    jobs = p.add_argument_group("cluster jobs")
    jobs.add_argument("--emit-jobs", metavar="DIR", help="write one shell command per unfinished cell to DIR/jobs.txt plus a SLURM array script, and stop")
    jobs.add_argument("-num_gpus", type=int, default=1, help="GPUs per job (nnU-Net DDP via nnUNetv2_train -num_gpus)")
    jobs.add_argument("--device-for-jobs", help="pass -device to the emitted nnU-Net commands (e.g. cpu)")
    jobs.add_argument("--slurm-gpus", type=int, help="GPUs requested per SLURM job (default: -num_gpus)")
    jobs.add_argument("--slurm-time", default="48:00:00", help="SLURM time limit per job (default 48:00:00)")
    jobs.add_argument("--slurm-cpus", type=int, default=12, help="CPUs per SLURM job (default 12)")
    jobs.add_argument("--slurm-mem", default="64G", help="memory per SLURM job (default 64G)")
    jobs.add_argument("--slurm-partition", help="SLURM partition")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmark.grid import make_grid

    if args.emit_jobs:
        from ..benchmark.jobs import SlurmOptions, emit_jobs

        slurm = SlurmOptions(gpus=args.slurm_gpus or max(1, args.num_gpus), time=args.slurm_time, cpus=args.slurm_cpus,
                             mem=args.slurm_mem, partition=args.slurm_partition)
        todo, done = emit_jobs(make_grid(args.d, args.c, args.f, args.tr, args.p), args.emit_jobs, args.num_gpus,
                               slurm, device=args.device_for_jobs)
        print(f"wrote {len(todo)} jobs to {args.emit_jobs}/jobs.txt ({len(done)} cells already finished); "
              f"see {args.emit_jobs}/README.txt")
        return 0
    from ..benchmark import BenchmarkCellsFailed, run_benchmark

    try:
        written = run_benchmark(args.d, args.c, args.f, args.tr, args.p, train=args.train, collect_only=args.collect,
                                baseline=args.baseline, out=args.o, device=args.device, epochs=args.epochs,
                                iterations=args.iterations, vector_scaling=args.vector_scaling,
                                conformal_alpha=args.conformal)
    except BenchmarkCellsFailed as failed:
        print_tables(failed.written)
        raise
    print_tables(written)
    return 0


def print_tables(written: dict) -> None:
    for path in written.values():
        print(path.read_text())
        print(f"written: {path.parent}/results.{{md,csv,json}}, cases.csv, reliability.png, ece_vs_dice.png, risk_coverage.png")
