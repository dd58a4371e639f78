"""``nnunet-mbls demo``: the whole pipeline on a generated dataset, on a fresh machine (CPU is fine).

Generates the synthetic 2D dataset, plans and preprocesses it with nnU-Net, trains stock
``nnUNetTrainer`` and ``nnUNetTrainerMbLS`` on fold 0 with a short schedule, runs the calibration
step on both, prints the benchmark table, and writes calibrated probability/uncertainty maps and the
QC table of fold 0's validation images with ``nnunet-mbls predict``. Everything goes under one folder; nnU-Net's path
variables are respected when they are set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoProfile:
    dataset_id: int
    name: str
    num_cases: int
    shape: tuple[int, ...]
    epochs: int
    iterations: int


#: ~12 minutes on 2 CPU cores; DESIGN's pilot: below ~50 x 20 iterations MbLS (no Dice term) has not
#: caught up with Dice+CE yet, so a shorter demo would show MbLS losing for the wrong reason
FULL = DemoProfile(990, "MbLSSynthetic", num_cases=40, shape=(96, 96), epochs=50, iterations=20)
#: for tests: seconds, not meaningful numbers
QUICK = DemoProfile(989, "MbLSSyntheticQuick", num_cases=10, shape=(48, 48), epochs=2, iterations=3)
DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerMbLS")


def set_nnunet_environment(out: Path, device: str) -> None:
    """nnU-Net's folders under ``out`` unless already set; small-machine settings on the CPU.

    Must run before nnU-Net is imported: it reads nnUNet_def_n_proc at import time.

    Args:
        out: the demo folder; ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` default to
            folders of those names in it.
        device: ``"cpu"`` also sets (unless set) ``nnUNet_def_n_proc=1``, ``nnUNet_n_proc_DA=0`` and
            ``nnUNet_compile=f``; other devices change nothing else.
    """
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(variable, str(out / variable))
    if device == "cpu":
        os.environ.setdefault("nnUNet_def_n_proc", "1")
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
        os.environ.setdefault("nnUNet_compile", "f")


def plan_and_preprocess(dataset_id: int, log_file: Path) -> None:
    """nnU-Net's own planning and preprocessing (2d configuration), once.

    Skipped when ``nnUNetPlans_2d`` of the dataset already exists in ``$nnUNet_preprocessed``.

    Args:
        dataset_id: the dataset to plan.
        log_file: ``nnUNetv2_plan_and_preprocess``'s output is appended here.

    Raises:
        RuntimeError: ``nnUNetv2_plan_and_preprocess`` failed (the message names ``log_file``).
    """
    from .layout import dataset_name

    preprocessed = Path(os.environ["nnUNet_preprocessed"])
    if (preprocessed / dataset_name(dataset_id) / "nnUNetPlans_2d").is_dir():
        return
    command = [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d",
               "-np", "1", "-npfp", "1", "--verify_dataset_integrity"]
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}  # planning needs workers
    with open(log_file, "a") as log:
        proc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log_file}")


def run_demo(out: str | os.PathLike = "nnunet_mbls_demo", quick: bool = False, trainers=DEFAULT_TRAINERS,
             device: str | None = None, epochs: int | None = None, iterations: int | None = None,
             seed: int = 0) -> Path:
    """Run the demo: dataset, planning, training and calibration of fold 0, the table, then predicted maps and QC.

    Steps already done (dataset generated, plans made, folds trained or calibrated) are skipped.

    Args:
        out: the demo folder (default ``nnunet_mbls_demo``); nnU-Net's path variables, when set, win.
        quick: the :data:`QUICK` profile (seconds, for tests) instead of :data:`FULL`.
        trainers: the trainers to compare (default stock ``nnUNetTrainer`` and ``nnUNetTrainerMbLS``); the
            table's baseline is ``nnUNetTrainer``.
        device: ``"cuda"``, ``"cpu"`` ...; None (default) picks CUDA when available.
        epochs: epochs per training; None keeps the profile's.
        iterations: iterations per epoch; None keeps the profile's.
        seed: seed of the generated dataset (default 0).

    Returns:
        The path of ``results.md``.

    Raises:
        RuntimeError: planning failed (see :func:`plan_and_preprocess`).
        BenchmarkCellsFailed: a training or calibration step failed (from
            :func:`~nnunet_mbls.benchmark.run_benchmark`).
    """
    import torch

    out = Path(out).resolve()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    set_nnunet_environment(out, device)
    profile = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)

    from .benchmark import run_benchmark
    from .data.synthetic import make_synthetic_dataset

    raw = Path(os.environ["nnUNet_raw"])
    steps = 5
    print(f"[1/{steps}] synthetic 2D dataset: {profile.num_cases} cases of {profile.shape[0]}x{profile.shape[1]} "
          f"(seed {seed}) in {raw}", flush=True)
    if not list(raw.glob(f"Dataset{profile.dataset_id:03d}_*")):
        make_synthetic_dataset(raw, dataset_id=profile.dataset_id, name=profile.name, num_cases=profile.num_cases,
                               shape=profile.shape, seed=seed)
    print(f"[2/{steps}] nnUNetv2_plan_and_preprocess -d {profile.dataset_id} -c 2d (log: {out / 'plan.log'})", flush=True)
    plan_and_preprocess(profile.dataset_id, out / "plan.log")
    epochs, iterations = epochs or profile.epochs, iterations or profile.iterations
    print(f"[3/{steps}] training {', '.join(trainers)} on fold 0 for {epochs} epochs x {iterations} iterations "
          f"on {device}, then nnU-Net's validation and the calibration step", flush=True)
    written = run_benchmark([profile.dataset_id], "2d", [0], list(trainers), train=True, baseline="nnUNetTrainer",
                            out=out / "benchmark", device=device, epochs=epochs, iterations=iterations,
                            log=lambda msg: print(f"      {msg}", flush=True))
    results = next(iter(written.values()))
    print(f"[4/{steps}] results ({results.parent}):\n", flush=True)
    print(results.read_text())
    if quick:
        print("(--quick: a few iterations only; the numbers show that the pipeline runs, not which loss is better)")
    print(f"[5/{steps}] calibrated probability and uncertainty maps, and QC, of fold 0's validation images "
          f"(nnunet-mbls predict --calibrated --maps ...)", flush=True)
    for trainer in trainers:
        qc = predict_validation_cases(out, profile.dataset_id, trainer, device)
        print(f"      {trainer}: {qc.parent} (maps/ for ITK-SNAP or 3D Slicer, qc.csv)", flush=True)
    return results


def predict_validation_cases(out: Path, dataset_id: int, trainer: str, device: str) -> Path:
    """``nnunet-mbls predict`` of fold 0's validation images with the calibrated fold 0.

    The images are linked (symbolic links) into ``out/predict/validation_images``; the output, with the maps
    ``probabilities``, ``confidence`` and ``entropy``, goes to ``out/predict/<trainer>``.

    Args:
        out: the demo folder.
        dataset_id: the demo dataset (2d configuration).
        trainer: the trainer whose fold 0 predicts.
        device: the device to predict on.

    Returns:
        The path of ``qc.csv``.
    """
    import json

    from .benchmark.grid import Cell
    from .inference.predict import predict
    from .layout import dataset_name

    cell = Cell(dataset_name(dataset_id), "2d", "0", trainer)
    cases = json.loads((Path(os.environ["nnUNet_preprocessed"]) / cell.dataset / "splits_final.json").read_text())[0]["val"]
    images = out / "predict" / "validation_images"
    images.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for image in (Path(os.environ["nnUNet_raw"]) / cell.dataset / "imagesTr").glob(f"{case}_*"):
            if not (images / image.name).exists():
                (images / image.name).symlink_to(image)
    return predict(images, out / "predict" / trainer, dataset_id, "2d", ["0"], trainer, calibrated=True,
                   maps=["probabilities", "confidence", "entropy"], device=device, num_processes_preprocessing=0)
