"""``nnunet-mbls``: the command line of the plugin. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys


def cmd_env(args: argparse.Namespace) -> int:
    from .paths import ext_trainer_folder

    # keeps folders already listed in nnUNet_extTrainer, so `eval "$(nnunet-mbls env)"` composes
    print(f'export nnUNet_extTrainer="{ext_trainer_folder()}${{nnUNet_extTrainer:+:$nnUNet_extTrainer}}"')
    return 0


def cmd_trainers(args: argparse.Namespace) -> int:
    from .trainers.catalog import CATALOG  # the classes' own source of truth, without importing nnU-Net

    width = max(len(spec.name) for spec in CATALOG)
    print(f"{'trainer':<{width}}  loss")
    print(f"{'nnUNetTrainer':<{width}}  stock nnU-Net Dice + CE (DC_and_CE_loss), the anchor to beat")
    for spec in CATALOG:
        params = ", ".join(f"{k}={v:g}" for k, v in spec.loss_kwargs.items())
        print(f"{spec.name:<{width}}  {spec.loss_class_name}({params})")
    return 0


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .calibration.reliability import plot_reliability
    from .evaluation import evaluate_folder
    from .io import atomic_write_json

    from .io import read_json_file, refuse_outputs_over_inputs

    out = Path(args.o) if args.o else Path(args.pred) / f"calibration_metrics_{args.region}.json"
    png = out.with_suffix(".png")
    refuse_outputs_over_inputs({"-o": out, "-o (its reliability diagram)": png},
                               {"-djfile": args.djfile or [], "-pfile": args.pfile or []},
                               {"-ref": args.ref, "-pred": args.pred},
                               replaceable=[f"calibration_metrics_{r}.{e}" for r in ("fg", "all", "boundary")
                                            for e in ("json", "png")])
    dataset_json = read_json_file(args.djfile, "-djfile") if args.djfile else None
    result = evaluate_folder(args.ref, args.pred, dataset_json, region=args.region, n_bins=args.bins,
                             boundary_width=args.boundary_width, chill=args.chill, plans=args.pfile,
                             num_processes=args.np)
    atomic_write_json(out, result)
    plot_reliability({f"{args.region} voxels (ECE {result['mean']['ece']:.4f})": result["reliability"]}, png,
                     title=f"{Path(args.pred).name}: reliability, {args.region} voxels, pooled")
    print_metrics(result)
    print(f"wrote {out} and {png}")
    return 0


def print_metrics(result: dict) -> None:
    mean = result["mean"]
    print(f"{result['num_cases']} cases, region {result['region']} (mean ± std over cases):")
    for key in ("ece", "cece", "nll", "brier", "mce", "ece_adaptive"):
        print(f"  {key:<12} {mean[key]:.4f} ± {mean[key + '_std']:.4f}")
    for key in ("dice", "hd95"):
        names = [k for k in mean[key] if not k.endswith(("_std", "_n"))]
        print(f"  {key:<12} " + ", ".join(f"{n} {mean[key][n]:.4f}" for n in names))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .benchmark.grid import Cell, dataset_name
    from .calibrate import calibrate_on_calibration_set, calibrate_trained_model, calibration_problem, ensemble_problem

    common = dict(max_voxels=args.max_voxels, seed=args.seed, region=args.region, fit_region=args.fit_region)
    if args.method == "vector":
        if args.calibration_set:
            raise ValueError("--method vector fits on the validation logits of the folds; it does not take "
                             "--calibration-set (use --method temperature there)")
        from .calibrate import prepare_fold_for_calibration
        from .vector_scaling import calibrate_vector

        folders = [prepare_fold_for_calibration(args.d, args.c, f, args.tr, args.p, args.device) for f in args.f]
        summary = calibrate_vector(folders, device=args.device, fallback=not args.no_fallback, **common)
        print(f"method: {summary['method'].get('chosen')} ({summary['method']['reason']})")
        return 0
    if args.calibration_set:
        summary = calibrate_on_calibration_set(args.d, args.c, args.f, args.tr, args.p, *args.calibration_set,
                                               device=args.device, step_size=args.step_size,
                                               disable_tta=args.disable_tta, num_processes=args.np, **common)
        print(f"T = {summary['temperature']:.4f} (calibration set), folded into folds {', '.join(summary['folds'])}")
        return 0
    if args.if_missing:
        folders = [Cell(dataset_name(args.d), args.c, str(f), args.tr, args.p).folder for f in args.f]
        problem = calibration_problem(folders[0]) if len(folders) == 1 else ensemble_problem(folders)
        if problem is None:
            print("calibration is up to date; nothing to do (--if-missing)")
            return 0
        print(f"calibrating (--if-missing): {problem}")
    summary = calibrate_trained_model(args.d, args.c, args.f if len(args.f) > 1 else args.f[0], args.tr, args.p,
                                      device=args.device, num_processes=args.np, **common)
    shared = f", shared by folds {', '.join(summary['folds'])}" if "folds" in summary else ""
    print(f"T = {summary['temperature']:.4f}{shared}")
    return 0


def cmd_apply_temperature(args: argparse.Namespace) -> int:
    from .calibration.files import apply_temperature_to_folder

    apply_temperature_to_folder(args.i, args.o, temperature=args.t, calibration_json=args.calibration_json)
    return 0


def flag_rule_from(args: argparse.Namespace):
    from .inference.qc import FlagRule

    if args.flag_score is None and args.flag_threshold is None:
        return None
    if args.flag_score is None or args.flag_threshold is None:
        raise ValueError("pass --flag-score and --flag-threshold together (e.g. --flag-score mean_fold_dice --flag-threshold 0.8)")
    return FlagRule(args.flag_score, args.flag_threshold)


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference.predict import predict

    qc = predict(args.i, args.o, args.d, args.c, args.f, args.tr, args.p, checkpoint=args.chk, calibrated=args.calibrated,
                 maps=args.maps or (), maps_dtype=args.maps_dtype, device=args.device, step_size=args.step_size,
                 disable_tta=args.disable_tta, num_processes_preprocessing=args.npp, flag_rule=flag_rule_from(args))
    print_qc_summary(qc)
    return 0


def cmd_maps(args: argparse.Namespace) -> int:
    from .inference.predict import maps_from_probabilities

    qc = maps_from_probabilities(args.i, args.o, temperature=args.t, calibration_json=args.calibration_json,
                                 maps=args.maps, maps_dtype=args.maps_dtype, flag_rule=flag_rule_from(args))
    print_qc_summary(qc)
    return 0


def print_qc_summary(qc_csv) -> None:
    import json

    summary = json.loads(qc_csv.with_suffix(".json").read_text())
    print(f"{len(summary['cases'])} cases, {summary['num_flagged']} flagged ({summary['flag_rule']})")
    for case, row in summary["cases"].items():
        if row["flag"]:
            print(f"  flagged: {case}")
    print(f"wrote {qc_csv} and {qc_csv.with_suffix('.json')}" + (f"; maps in {qc_csv.parent / 'maps'}"
                                                                   if summary["settings"]["maps"] else ""))


def add_map_and_flag_options(p: argparse.ArgumentParser, default_maps) -> None:
    from .inference import MAP_KINDS, SCORE_DIRECTION

    p.add_argument("--maps", nargs="+", choices=MAP_KINDS, default=default_maps, metavar="KIND",
                   help=f"maps to write into OUT/maps/ as NIfTI in the input geometry: {', '.join(MAP_KINDS)}")
    p.add_argument("--maps-dtype", choices=["float32", "uint8"], default="float32",
                   help="uint8 stores probabilities and confidence as 0..255 with NIfTI scale slope 1/255 (4x smaller)")
    p.add_argument("--flag-score", choices=list(SCORE_DIRECTION),
                   help="QC score of the flag rule (default: mean_fold_dice < 0.8 with >= 2 folds, else mean_entropy_fg > 0.3)")
    p.add_argument("--flag-threshold", type=float, help="threshold of --flag-score (entropies: flag above; Dice: flag below)")


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark.grid import make_grid

    if args.emit_jobs:
        from .benchmark.jobs import SlurmOptions, emit_jobs

        slurm = SlurmOptions(gpus=args.slurm_gpus or max(1, args.num_gpus), time=args.slurm_time, cpus=args.slurm_cpus,
                             mem=args.slurm_mem, partition=args.slurm_partition)
        todo, done = emit_jobs(make_grid(args.d, args.c, args.f, args.tr, args.p), args.emit_jobs, args.num_gpus,
                               slurm, device=args.device_for_jobs)
        print(f"wrote {len(todo)} jobs to {args.emit_jobs}/jobs.txt ({len(done)} cells already finished); "
              f"see {args.emit_jobs}/README.txt")
        return 0
    from .benchmark import BenchmarkCellsFailed, run_benchmark

    try:
        written = run_benchmark(args.d, args.c, args.f, args.tr, args.p, train=args.train, collect_only=args.collect,
                                baseline=args.baseline, out=args.o, device=args.device, epochs=args.epochs,
                                iterations=args.iterations, vector_scaling=args.vector_scaling)
    except BenchmarkCellsFailed as failed:
        print_tables(failed.written)
        raise
    print_tables(written)
    return 0


def print_tables(written: dict) -> None:
    for path in written.values():
        print(path.read_text())
        print(f"written: {path.parent}/results.{{md,csv,json}}, cases.csv, reliability.png, ece_vs_dice.png, risk_coverage.png")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.o, quick=args.quick, trainers=args.tr, device=args.device, epochs=args.epochs,
             iterations=args.iterations, seed=args.seed)
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from . import data

    synthetic_only = {"--shape": args.shape, "--ignore-label": args.ignore_label, "--channels": args.channels != 1,
                      "--spacing": args.spacing}
    given = [flag for flag, value in synthetic_only.items() if value]
    if args.kind != "synthetic" and given:
        raise ValueError(f"{', '.join(given)} only apply to the synthetic kind, not {args.kind}; drop them")
    if args.layout == "nnunet" and args.test_cases:
        raise ValueError(f"--test-cases {args.test_cases} is for --layout msd (MSD's imagesTs); drop it or add --layout msd")
    out = args.o or args.raw or (os.environ.get("nnUNet_raw") if args.layout == "nnunet" else ".")
    if not out:
        raise ValueError("nnUNet_raw is not set: export it or pass -o FOLDER")

    def build(root: str, num_cases: int):
        common = dict(num_cases=num_cases, seed=args.seed, overwrite=args.overwrite)
        if args.id is not None:
            common["dataset_id"] = args.id
        if args.kind == "synthetic":
            return data.make_synthetic_dataset(root, shape=tuple(args.shape) if args.shape else (96, 96),
                                               ignore_label=args.ignore_label, channels=args.channels,
                                               spacing=args.spacing, **common)
        if args.kind == "ch2-deepgm":
            return data.make_ch2_deepgm_dataset(root, **common)
        return data.make_totalseg_abdomen_dataset(root, **common)

    if args.layout == "nnunet":
        folder = build(out, args.num_cases)
        print(f"wrote {folder}\nnext: nnUNetv2_plan_and_preprocess -d {folder.name[7:10].lstrip('0')} --verify_dataset_integrity")
        return 0
    with tempfile.TemporaryDirectory(prefix="nnunet_mbls_msd_") as tmp:
        source = build(tmp, args.num_cases + args.test_cases)
        dataset_id, name = int(source.name[7:10]), source.name[11:]
        task = data.write_msd_task(source, out, dataset_id, name, args.test_cases, args.overwrite)
    print(f"wrote {task} ({args.num_cases} training, {args.test_cases} test cases)\n"
          f"next: nnUNetv2_convert_MSD_dataset -i {task} && nnUNetv2_plan_and_preprocess -d {dataset_id} "
          f"--verify_dataset_integrity")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-mbls",
        description="Calibrated nnU-Net v2: MbLS and baseline trainers, calibration metrics, temperature scaling.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the export line that lets nnU-Net find our trainers").set_defaults(func=cmd_env)
    sub.add_parser("trainers", help="list every trainer with its loss and hyper-parameters").set_defaults(
        func=cmd_trainers
    )

    p = sub.add_parser("evaluate", help="calibration (ECE, CECE, NLL, Brier) and Dice/HD95 of a folder of nnU-Net .npz files")
    p.add_argument("-ref", required=True, help="folder of reference segmentations (e.g. nnUNet_preprocessed/DatasetX/gt_segmentations)")
    p.add_argument("-pred", required=True, help="folder of .npz probabilities (nnUNetv2_train --npz, nnUNetv2_predict --save_probabilities)")
    p.add_argument("-djfile", help="dataset.json (default: found next to -pred or -ref)")
    p.add_argument("-pfile", help="plans.json of the model (default: found next to -pred, where nnU-Net writes it); its "
                                  "transpose_forward maps nnU-Net's crop box to the image axes")
    p.add_argument("--region", choices=["fg", "all", "boundary"], default="fg",
                   help="voxels scored: fg = ground truth != 0 (the paper's, default), all = inside nnU-Net's crop box, boundary = band around label boundaries")
    p.add_argument("--bins", type=int, default=15, help="equal-width confidence bins (default 15)")
    p.add_argument("--boundary-width", type=int, default=2, help="half-width in voxels of the boundary band (default 2)")
    p.add_argument("--chill", action="store_true",
                   help="evaluate only the predicted cases (e.g. one fold's validation/ against all of gt_segmentations), as nnUNetv2_evaluate_folder -chill")
    p.add_argument("-o", help="output JSON (default: PRED/calibration_metrics_<region>.json); a reliability PNG is written next to it")
    p.add_argument("-np", type=int, default=None,
                   help="worker processes over the cases (default: nnU-Net's default_num_processes, i.e. "
                        "nnUNet_def_n_proc or 8, at most one per case and per CPU; 1 for folders under 512 MiB of "
                        ".npz; 1 = in this process); the result is the same for any value")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit temperature scaling on trained folds; write calibration.json and checkpoint_final_calibrated.pth")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", required=True,
                   help="fold(s); several folds get ONE temperature fitted on their pooled out-of-fold validation cases "
                        "and folded into each (the calibrated ensemble of nnUNetv2_predict -f ...)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer: stock models work too)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-device", default=None, help="device for a missing validation run (default: cuda if available, else cpu)")
    p.add_argument("--calibration-set", nargs=2, metavar=("IMAGES", "LABELS"),
                   help="fit T on the listed folds' ensemble output (nnU-Net's predictor, TTA as deployed) on a labelled "
                        "held-out set instead of the validation cases")
    p.add_argument("-step_size", type=float, default=0.5, help="--calibration-set: sliding-window step (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="--calibration-set: predict without mirroring, as deployed")
    p.add_argument("--method", choices=["temperature", "vector"], default="temperature",
                   help="temperature (default): one scalar T; vector: a scale and bias per class on the logits (one more "
                        "inference pass over the validation cases), kept only if its cross-validated NLL over cases beats T")
    p.add_argument("--no-fallback", action="store_true",
                   help="--method vector: keep vector scaling even when it does not beat temperature scaling (recorded)")
    p.add_argument("--fit-region", choices=["all", "fg"], default=None,
                   help="voxels T is fitted on: all (inside nnU-Net's crop box) or fg (ground truth != 0); default all, "
                        "see docs/BENCHMARKS.md")
    p.add_argument("--max-voxels", type=int, default=1_000_000, help="voxel subsample size for the temperature fit (default 1e6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voxel subsample (default 0)")
    p.add_argument("--region", choices=["fg", "all", "boundary"], default="fg", help="voxels of the reported metrics (default fg)")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when the calibration (of the fold, or of the ensemble of the folds) is newer than the checkpoints")
    p.add_argument("-np", type=int, default=None,
                   help="worker processes over the validation cases (default: nnU-Net's default_num_processes, i.e. "
                        "nnUNet_def_n_proc or 8, at most one per case and per CPU; 1 for folders under 512 MiB of "
                        ".npz; 1 = in this process); the result is the same for any value")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("apply-temperature", help="rescale the probabilities of .npz files: normalize(p ** (1/T))")
    p.add_argument("-i", required=True, help="input folder of nnU-Net .npz (+ .pkl) files")
    p.add_argument("-o", required=True, help="output folder (must differ from -i; nothing is overwritten)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-t", type=float, help="temperature T > 0")
    group.add_argument("--calibration-json", help="take T from a calibration.json written by calibrate")
    p.set_defaults(func=cmd_apply_temperature)

    p = sub.add_parser("predict", help="nnUNetv2_predict plus calibrated probability/uncertainty maps (NIfTI) and a QC table")
    p.add_argument("-i", required=True, help="input folder of images (nnU-Net naming, CASE_0000.nii.gz ...)")
    p.add_argument("-o", required=True, help="output folder: segmentations, maps/, qc.csv, qc.json")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("--calibrated", action="store_true",
                   help="use each fold's calibration: checkpoint_final_calibrated.pth, else the temperature of its calibration.json")
    add_map_and_flag_options(p, None)
    p.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-npp", type=int, default=3, help="preprocessing worker processes (default 3; 0 = in this process)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("maps", help="probability/uncertainty maps and QC from a nnUNetv2_predict --save_probabilities folder")
    p.add_argument("-i", required=True, help="folder with .npz, .pkl and segmentations written by nnUNetv2_predict")
    p.add_argument("-o", required=True, help="output folder: maps/, qc.csv, qc.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-t", type=float, help="apply temperature T first: normalize(p ** (1/T))")
    group.add_argument("--calibration-json", help="take T from a calibration.json written by calibrate")
    add_map_and_flag_options(p, ["probabilities", "entropy"])
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("benchmark", help="paper-style table (Dice, HD95, ECE, CECE, NLL, Brier) of trained models vs stock nnU-Net")
    p.add_argument("-d", nargs="+", required=True, help="dataset names or ids")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", required=True, help="folds, e.g. 0 1 2 3 4")
    p.add_argument("-tr", nargs="+", required=True, help="trainers, e.g. nnUNetTrainer nnUNetTrainerMbLS nnUNetTrainerLS")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--baseline", default="nnUNetTrainer", help="trainer the paired differences refer to (default nnUNetTrainer)")
    p.add_argument("--train", action="store_true", help="train unfinished folds here (interrupted ones continue)")
    p.add_argument("--collect", action="store_true", help="only build the table from finished folds; list missing ones")
    p.add_argument("--vector-scaling", action="store_true",
                   help="add rows for vector scaling shared by each trainer's folds (one more inference pass over the "
                        "validation cases per fold; measured only, nothing is written into the folds)")
    p.add_argument("--epochs", type=int, help="override the trainers' number of epochs (short schedules; default: the trainer's)")
    p.add_argument("--iterations", type=int, help="override the iterations per epoch (default: the trainer's)")
    p.add_argument("-device", default=None, help="device for training and validation (default: cuda if available, else cpu)")
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
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("demo", help="the whole pipeline on a generated dataset (CPU is fine): stock nnU-Net vs MbLS")
    p.add_argument("-o", default="nnunet_mbls_demo", help="output folder (default ./nnunet_mbls_demo); nnU-Net's path variables win when set")
    p.add_argument("--quick", action="store_true", help="tiny dataset and schedule (a smoke test, about 2 minutes)")
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerMbLS"], help="trainers (default: stock and MbLS)")
    p.add_argument("-device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--epochs", type=int, help="override the schedule's epochs (default 50, quick 2)")
    p.add_argument("--iterations", type=int, help="override iterations per epoch (default 20, quick 3)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dataset", help="write a dataset (nnU-Net raw or MSD layout): synthetic, ch2-deepgm (real MRI anatomy), totalseg-abdomen (real CT)")
    p.add_argument("kind", choices=["synthetic", "ch2-deepgm", "totalseg-abdomen"])
    p.add_argument("-o", help="output folder (default: $nnUNet_raw for --layout nnunet, the current folder for --layout msd)")
    p.add_argument("--raw", help=argparse.SUPPRESS)  # the earlier name of -o
    p.add_argument("--layout", choices=["nnunet", "msd"], default="nnunet",
                   help="nnunet: DatasetXXX_Name in nnU-Net's raw format (default); msd: a Medical Segmentation Decathlon "
                        "TaskXXX_Name folder (4D NIfTI for several channels) for nnUNetv2_convert_MSD_dataset")
    p.add_argument("--test-cases", type=int, default=0, help="msd layout: extra unlabelled cases in imagesTs (default 0)")
    p.add_argument("--id", type=int, help="dataset id (default 990 synthetic, 991 ch2-deepgm, 992 totalseg-abdomen)")
    p.add_argument("-n", "--num-cases", type=int, default=20, help="number of training cases (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs="+", help="synthetic only: 2 (2D) or 3 (3D) sizes, e.g. 96 96 or 32 48 48")
    p.add_argument("--spacing", type=float, nargs="+", help="synthetic only: mm per axis, in the order of --shape (default 1)")
    p.add_argument("--channels", type=int, default=1, help="synthetic only: input channels (default 1)")
    p.add_argument("--ignore-label", action="store_true", help="synthetic only: add an ignore label")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(func=cmd_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from .errors import NnunetMblsError

    args = build_parser().parse_args(argv)
    if getattr(args, "device", "") is None:  # resolved here, not in the parser: --help and env import no torch
        args.device = default_device()
    try:
        return args.func(args)
    except (NnunetMblsError, ValueError, OSError, RuntimeError) as error:
        # errors of bad input or missing prerequisites: one clear line (set NNUNET_MBLS_DEBUG=1 for the traceback)
        if os.environ.get("NNUNET_MBLS_DEBUG"):
            raise
        print(f"nnunet-mbls {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
