"""One GPU check of nnunet-mbls: losses, trainer steps, calibration step and calibrated prediction on CUDA.

Written for a single run on a lent GPU machine (no internet, one call, at most 8 minutes); every part
that fails or cannot run is recorded with its reason and the script goes on. Output: ``OUT/gpu_check.json``
(every number, the machine, the exact command) and ``OUT/gpu_check.md`` (the tables), rewritten after each
part so that an interrupted run still leaves what it measured.

Parts, in the order they run (cheap and most important first, torch.compile last):

1. Losses: every registered loss (``nnunet_mbls.losses.LOSSES``) against nnU-Net's ``DC_and_CE_loss`` as stock
   ``nnUNetTrainer`` builds it, through ``bench_losses`` (same deep-supervision pyramid, same wrapper):
   forward + backward under autocast fp16 and bf16, 3D (2, C, 128^3) and 2D (12, C, 512^2), C in {3, 8}.
   Time: median of ``--repeats`` paired rounds (``_common.paired_rounds``, order rotated per round) after
   ``--warmup`` untimed calls; memory: ``_common.peak_extra_bytes`` (on CUDA ``max_memory_allocated`` after
   ``reset_peak_memory_stats``, minus the memory allocated before the call). Ratios are median time (peak
   memory) of the loss divided by that of DC_and_CE in the same case; the median of the within-round
   ratios is kept too (``paired_time_ratio``).
2. Setup: a synthetic 3D dataset (``make_synthetic_dataset``) and real ``nnUNetv2_plan_and_preprocess``
   (``bench_trainer.plan_and_preprocess``).
3. Trainer steps, nnU-Net's compile setting off (``nnUNet_compile=f``): ``train_step`` and ``validation_step``
   of ``nnUNetTrainerMbLS`` against ``nnUNetTrainer`` (same initial weights, same fixed batches,
   ``bench_trainer.stepper``), validation in eval mode under ``no_grad`` as nnU-Net runs it.
4. Pipeline: fold 0 of ``nnUNetTrainerMbLS`` trained for one short epoch (setup), nnU-Net's validation with
   probabilities (setup), then timed: our calibration step (``calibrate_output_folder``) and
   ``nnUNetv2_predict -chk checkpoint_final_calibrated.pth --save_probabilities`` on the validation images.
5. Trainer steps with ``nnUNet_compile=t`` (nnU-Net decides in ``_do_i_compile``; it refuses on the CPU).

Targets printed next to the ratios: MbLS <= 1.0x DC+CE time and memory, every other loss <= 1.5x,
trainer step <= 1.03x the stock trainer's time.

``--budget-s`` (default 420) is a soft budget: a part that would start after it, or (on CUDA) that is
expected to need more than what is left, is skipped and recorded as 'time budget'.

``--dry-run`` runs the same code on the CPU at toy sizes (3D (2, C, 16^3), 2D (2, C, 32^2), 6 cases of
16x24x24, 1-2 iterations), autocast in every dtype the CPU autocast of this torch accepts (the others are
recorded as skipped with the reason), compile as nnU-Net allows it (not on the CPU: recorded as skipped),
one CPU thread (``--threads``).

    python benchmarks/gpu_check.py --out gpu_check_out                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check      # here, CPU, < 2 minutes
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the budget counts from here (imports included)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import (MiB, load_average, machine_info, markdown_table, paired_rounds, peak_extra_bytes,  # noqa: E402
                     time_once)

ANCHOR = "DC_and_CE"  # bench_losses.ANCHOR (not imported at module level: see set_nnunet_env)
STOCK, MBLS = "nnUNetTrainer", "nnUNetTrainerMbLS"
CONFIGURATION = "3d_fullres"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = {"mbls": 1.0, "other_losses": 1.5, "trainer_step": 1.03}

#: what each mode runs; None in the arguments means "the mode's default"
MODES = {
    "cuda": dict(loss_shapes={"3d": (2, (128, 128, 128)), "2d": (12, (512, 512))}, repeats=10, warmup=2,
                 shape=[96, 128, 128], cases=6, trainer_iterations=10, trainer_warmup=3, batches=4,
                 fold_iterations=5),
    "dry-run": dict(loss_shapes={"3d": (2, (16, 16, 16)), "2d": (2, (32, 32))}, repeats=2, warmup=1,
                    shape=[16, 24, 24], cases=6, trainer_iterations=2, trainer_warmup=1, batches=2,
                    fold_iterations=2),
}

#: rough seconds a part needs on the H200 (a part is skipped when less than this is left of the budget);
#: the CPU dry run uses no estimates (its parts are toy sized)
CUDA_NEEDS_S = {"loss_case": 10, "setup": 60, "trainer_steps_off": 45, "pipeline": 75,
                "trainer_steps_on/train_step": 150, "trainer_steps_on/validation_step": 60}


class Budget:
    """Soft time budget counted from the start of the script."""

    def __init__(self, budget_s: float, estimates: dict[str, float]):
        self.budget_s, self.estimates = budget_s, estimates

    def elapsed(self) -> float:
        return time.perf_counter() - _STARTED

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def refuse(self, part: str) -> str | None:
        """The 'time budget' reason when ``part`` should not start any more, else None."""
        need = self.estimates.get(part, 0.0)
        left = self.left()
        if left <= 0 or left < need:
            return (f"time budget: {self.elapsed():.0f} s of --budget-s {self.budget_s:g} s used, {max(left, 0):.0f} s "
                    f"left" + (f", this part needs about {need:g} s" if need else ""))
        return None


class Report:
    """Everything measured or not measured, written as JSON and markdown after each part."""

    def __init__(self, out: Path, args: argparse.Namespace, mode: str, device: torch.device, budget: Budget):
        self.out, self.args, self.mode, self.device, self.budget = out, args, mode, device, budget
        self.data = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "argv": list(sys.argv),
            "cwd": os.getcwd(),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": mode,
            "device": device.type,
            "machine": machine_info(),
            "budget_s": budget.budget_s,
            "elapsed_s": None,
            "part_wall_s": {},
            "targets": {"mbls": {"time": TARGETS["mbls"], "memory": TARGETS["mbls"]},
                        "other_losses": {"time": TARGETS["other_losses"], "memory": TARGETS["other_losses"]},
                        "trainer_step": {"time": TARGETS["trainer_step"]}},
            "settings": {},
            "losses": [],
            "setup": [],
            "trainer_steps": [],
            "pipeline": [],
            "skipped": [],
        }
        if device.type == "cuda":
            self.data["machine"]["cuda"] = {
                "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "memory_total_bytes": torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
            }

    def timed(self, name: str, fn, *args, **kwargs):
        """Run one part, record its wall time under part_wall_s, save the report; return what fn returns."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.data["part_wall_s"][name] = round(time.perf_counter() - t0, 2)
            self.save()

    def skip(self, part: str, reason: str, **what) -> None:
        """Record something deliberately not run (unsupported, time budget, no CUDA, ...)."""
        self.data["skipped"].append({"part": part, **what, "kind": "skipped", "reason": reason})
        print(f"[gpu_check] skipped {part} {what or ''}: {reason}", flush=True)

    def error(self, part: str, error: BaseException, **what) -> None:
        """Record a part that raised; the script goes on."""
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, subprocess.CalledProcessError):
            reason += f"\n{(error.stderr or '')[-2000:]}"
        self.data["skipped"].append({"part": part, **what, "kind": "error", "reason": reason[:3000],
                                     "traceback": traceback.format_exc()[-3000:]})
        print(f"[gpu_check] ERROR in {part} {what or ''}: {reason[:3000]}", flush=True)
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a broken CUDA context must not end the script
                pass

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.data["machine"]["loadavg_end"] = load_average()
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(clean(self.data), indent=2, allow_nan=False)),
                           ("gpu_check.md", render_markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text + "\n")
            tmp.replace(self.out / name)


def clean(value):
    """JSON-safe copy: non-finite floats become None, tuples lists, numpy/torch scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# part 1: losses


def autocast_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why autocast to ``dtype`` cannot run on ``device`` (None when it can): asks torch, never assumes."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"bf16 unsupported: torch.cuda.is_bf16_supported() is False on {torch.cuda.get_device_name()}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            a = torch.ones(4, 4, device=device)
            with torch.autocast(device.type, dtype=dtype):
                result_dtype = (a @ a).dtype
        except Exception as error:  # noqa: BLE001
            return f"{name} autocast unsupported on {device.type}: {type(error).__name__}: {error}"
    if result_dtype != dtype:
        said = "; ".join(str(w.message) for w in caught)
        return (f"{name} autocast unsupported on {device.type} by torch {torch.__version__} (a matmul under "
                f"autocast gave {result_dtype})" + (f": {said}" if said else ""))
    return None


def loss_case(report: Report, cfg: dict, device: torch.device, dim: str, classes: int, dtype_name: str,
              loss_names: list[str]) -> None:
    """All losses of one (dim, C, dtype) case; appends rows to report.data['losses'] or skip entries."""
    import bench_losses

    batch, spatial = cfg["loss_shapes"][dim]
    names = [ANCHOR] + loss_names
    shape = f"({batch}, {classes}, {' x '.join(map(str, spatial))})"
    case = {"dim": dim, "classes": classes, "dtype": dtype_name, "shape": shape}
    dtype = DTYPES[dtype_name]
    reason = autocast_refusal(device, dtype) or report.budget.refuse("loss_case" if device.type == "cuda" else "")
    if reason:
        report.skip("losses", reason, losses=names, **case)
        return
    try:
        logits, targets = bench_losses.make_pyramid(batch, classes, spatial, dtype, device)
        losses = bench_losses.build_losses(len(logits), device, loss_names)
        steps = {name: bench_losses.step_fn(loss, logits, targets, device, dtype) for name, loss in losses.items()}
    except Exception as error:  # noqa: BLE001
        report.error("losses", error, losses=names, **case)
        return
    working, warmup_s = {}, {}
    for name, step in steps.items():  # warm-up (excluded from the timing); a loss that raises is set aside
        try:
            warmup_s[name] = [time_once(step, device)[0] for _ in range(cfg["warmup"])]
            working[name] = step
        except Exception as error:  # noqa: BLE001
            report.error("losses", error, losses=[name], **case)
    if not working:
        return
    anchor = ANCHOR if ANCHOR in working else next(iter(working))
    try:
        timing = paired_rounds(working, anchor, cfg["repeats"], device)
        memory = {name: peak_extra_bytes(step, device) for name, step in working.items()}
    except Exception as error:  # noqa: BLE001
        report.error("losses", error, losses=list(working), **case)
        return
    base = (timing[ANCHOR]["wall_median_s"], memory[ANCHOR]) if ANCHOR in working else None
    for name in working:
        t, m = timing[name]["wall_median_s"], memory[name]
        target = None if name == ANCHOR else TARGETS["mbls"] if name == "mbls" else TARGETS["other_losses"]
        row = {**case, "scales": len(logits), "loss": name, "time_s": t, "times_s": timing[name]["wall_s"],
               "warmup_s": warmup_s[name], "memory_bytes": m, "target_ratio": target,
               "time_ratio": t / base[0] if base else None, "memory_ratio": m / base[1] if base else None,
               "paired_time_ratio": timing[name]["wall_ratio"] if base else None}
        if target is not None and base:
            row["meets_time_target"] = row["time_ratio"] <= target
            row["meets_memory_target"] = row["memory_ratio"] <= target
        report.data["losses"].append(row)
    del logits, targets, losses, steps, working
    if device.type == "cuda":
        torch.cuda.empty_cache()


def losses_part(report: Report, cfg: dict, device: torch.device, args: argparse.Namespace) -> None:
    from nnunet_mbls.losses import LOSSES

    loss_names = args.losses or list(LOSSES)
    for dim in args.dims:
        for classes in args.classes:
            for dtype_name in args.dtypes:
                loss_case(report, cfg, device, dim, classes, dtype_name, loss_names)
                report.save()


# ----------------------------------------------------------------------------------------------------------
# part 2-5: dataset, trainers, calibration, prediction


def prepare_dataset(report: Report, cfg: dict, args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """Synthetic dataset + nnUNetv2_plan_and_preprocess (bench_trainer's); None when done, else why not."""
    import bench_trainer

    what = {"what": f"make_synthetic_dataset ({cfg['cases']} cases of {'x'.join(map(str, cfg['shape']))}) + "
                    f"nnUNetv2_plan_and_preprocess -c {CONFIGURATION}"}
    reason = report.budget.refuse("setup" if report.device.type == "cuda" else "")
    if reason:
        report.skip("setup", reason, **what)
        return reason
    bench_trainer.ARGS = argparse.Namespace(cases=cfg["cases"], shape=cfg["shape"], configuration=CONFIGURATION)
    try:
        wall = bench_trainer.plan_and_preprocess(args.dataset_id, env)
    except Exception as error:  # noqa: BLE001
        report.error("setup", error, **what)
        return f"not run: the dataset setup failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    plans = json.loads((Path(env["nnUNet_preprocessed"]) / maybe_convert_to_dataset_name(args.dataset_id)
                        / "nnUNetPlans.json").read_text())["configurations"][CONFIGURATION]
    report.data["setup"].append({**what, "wall_s": wall, "patch_size": plans["patch_size"],
                                 "batch_size": plans["batch_size"]})
    return None


def build_trainers(dataset_id: int, device: torch.device, compile_setting: str) -> dict:
    """Stock and MbLS trainers, initialised under ``nnUNet_compile=compile_setting``, with equal initial weights.

    As ``bench_trainer.build_trainers``, but on ``device`` (that one is CPU-only).
    """
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ["nnUNet_compile"] = compile_setting
    os.environ["nnUNet_n_proc_DA"] = "0"  # training only (0 crashes plan_and_preprocess)
    trainers = {}
    for name in (STOCK, MBLS):
        trainer = get_trainer_from_args(str(dataset_id), CONFIGURATION, 0, name, device=device)
        trainer.initialize()
        trainers[name] = trainer
    reference = trainers[STOCK].network.state_dict()
    for trainer in trainers.values():
        trainer.network.load_state_dict(reference)
    return trainers


def is_compiled(trainer) -> bool:
    return hasattr(trainer.network, "_orig_mod")  # torch.compile's OptimizedModule


def trainer_steps_part(report: Report, cfg: dict, device: torch.device, args: argparse.Namespace, compile_on: bool,
                       batches: list | None) -> list | None:
    """train_step and validation_step of MbLS vs stock under one compile setting; returns the batches used."""
    import bench_trainer

    setting = "t" if compile_on else "f"
    label = "on" if compile_on else "off"
    key = f"trainer_steps_{label}"
    cuda = device.type == "cuda"
    reason = report.budget.refuse((f"{key}/train_step" if compile_on else key) if cuda else "")
    if reason:
        for kind in ("train_step", "validation_step"):
            report.skip("trainer_steps", reason, compile=label, step=kind)
        return batches
    try:
        trainers = build_trainers(args.dataset_id, device, setting)
        if batches is None:
            batches = bench_trainer.fetch_batches(trainers[STOCK], cfg["batches"])
    except Exception as error:  # noqa: BLE001
        for kind in ("train_step", "validation_step"):
            report.error("trainer_steps", error, compile=label, step=kind)
        return batches
    compiled = {name: is_compiled(t) for name, t in trainers.items()}
    if compile_on and not all(compiled.values()):
        decided = {name: t._do_i_compile() for name, t in trainers.items()}
        reason = (f"nnUNet_compile=t, but nnU-Net's nnUNetTrainer._do_i_compile() returned {decided} on device "
                  f"{device.type}" + (" (nnU-Net disables torch.compile on the CPU: 'CPU compile crashes for 2D "
                                      "models'), so the trainers run uncompiled: nothing different to time"
                                      if device.type == "cpu" else ""))
        for kind in ("train_step", "validation_step"):
            report.skip("trainer_steps", reason, compile=label, step=kind)
        return batches
    patch = list(batches[0]["data"].shape)
    for kind in ("train_step", "validation_step"):
        if compile_on and kind == "validation_step":
            reason = report.budget.refuse(f"{key}/{kind}" if cuda else "")
            if reason:
                report.skip("trainer_steps", reason, compile=label, step=kind)
                continue
        try:
            for trainer in trainers.values():  # as nnU-Net's on_train_epoch_start / on_validation_epoch_start
                trainer.network.train() if kind == "train_step" else trainer.network.eval()
            steps = {name: bench_trainer.stepper(t, kind, batches) for name, t in trainers.items()}
            warmup_s = {name: [time_once(step, device)[0] for _ in range(cfg["trainer_warmup"])]
                        for name, step in steps.items()}  # includes the compilation when compiled
            timing = paired_rounds(steps, STOCK, cfg["trainer_iterations"], device)
            memory = {name: peak_extra_bytes(step, device) for name, step in steps.items()}
        except Exception as error:  # noqa: BLE001
            report.error("trainer_steps", error, compile=label, step=kind)
            continue
        for name in steps:
            t, m = timing[name]["wall_median_s"], memory[name]
            row = {"compile": label, "compiled": compiled[name], "step": kind, "trainer": name, "batch_shape": patch,
                   "time_s": t, "times_s": timing[name]["wall_s"], "warmup_s": warmup_s[name], "memory_bytes": m,
                   "time_ratio": t / timing[STOCK]["wall_median_s"], "memory_ratio": m / memory[STOCK],
                   "paired_time_ratio": timing[name]["wall_ratio"],
                   "target_ratio": None if name == STOCK else TARGETS["trainer_step"]}
            if name != STOCK:
                row["meets_time_target"] = row["time_ratio"] <= TARGETS["trainer_step"]
            report.data["trainer_steps"].append(row)
        report.save()
    del trainers
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return batches


def pipeline_part(report: Report, cfg: dict, device: torch.device, args: argparse.Namespace, root: Path) -> None:
    """Train fold 0 of nnUNetTrainerMbLS briefly, nnU-Net's validation with probabilities, then the timed parts:
    our calibration step and a calibrated nnUNetv2_predict."""
    cal_what = {"what": "calibration step: nnunet_mbls.calibration.folds.calibrate_output_folder(fold_0)"}
    pred_what = {"what": "nnUNetv2_predict -chk checkpoint_final_calibrated.pth --save_probabilities"}
    reason = report.budget.refuse("pipeline" if device.type == "cuda" else "")
    if reason:
        report.skip("pipeline", reason, item="calibrate", **cal_what)
        report.skip("pipeline", reason, item="predict", **pred_what)
        return
    try:
        from nnunetv2.run.run_training import get_trainer_from_args
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        os.environ["nnUNet_compile"] = "f"  # the fold is only a means to the two timed parts
        os.environ["nnUNet_n_proc_DA"] = "0"
        trainer = get_trainer_from_args(str(args.dataset_id), CONFIGURATION, 0, MBLS, device=device)
        trainer.num_epochs, trainer.num_iterations_per_epoch = 1, cfg["fold_iterations"]
        trainer.num_val_iterations_per_epoch = 1
        t0 = time.perf_counter()
        trainer.run_training()
        report.data["setup"].append({"what": f"train fold 0 of {MBLS}: 1 epoch of {cfg['fold_iterations']} iterations "
                                             f"(nnUNet_compile=f)", "wall_s": time.perf_counter() - t0})
        t0 = time.perf_counter()
        nnUNetTrainer.perform_actual_validation(trainer, save_probabilities=True)  # stock: no calibration step inside
        report.data["setup"].append({"what": "nnU-Net's final validation with probabilities (--npz)",
                                     "wall_s": time.perf_counter() - t0})
        folder = Path(trainer.output_folder)
        _, val_keys = trainer.do_split()
        del trainer
        gc.collect()
    except Exception as error:  # noqa: BLE001
        report.error("pipeline", error, item="calibrate", **cal_what)
        report.skip("pipeline", "not run: training the fold it needs failed (see the calibration entry)",
                    item="predict", **pred_what)
        return
    report.save()

    from nnunet_mbls.calibration.folds import calibrate_output_folder
    from nnunet_mbls.layout import CALIBRATED_CHECKPOINT

    try:
        t0 = time.perf_counter()
        summary = calibrate_output_folder(folder)
        wall = time.perf_counter() - t0
        report.data["pipeline"].append({**cal_what, "item": "calibrate", "wall_s": wall,
                                        "temperature": summary["temperature"], "num_cases": summary.get("num_cases"),
                                        "wrote": summary.get("calibrated_checkpoint")})
    except Exception as error:  # noqa: BLE001
        report.error("pipeline", error, item="calibrate", **cal_what)
    report.save()

    if not (folder / CALIBRATED_CHECKPOINT).is_file():
        report.skip("pipeline", f"{CALIBRATED_CHECKPOINT} was not written (see the calibration step)", item="predict",
                    **pred_what)
        return
    reason = report.budget.refuse("")
    if reason:
        report.skip("pipeline", reason, item="predict", **pred_what)
        return
    try:
        raw = Path(os.environ["nnUNet_raw"]) / folder.parent.parent.name / "imagesTr"
        inputs, outputs = root / "predict_in", root / "predict_out"
        shutil.rmtree(inputs, ignore_errors=True)
        shutil.rmtree(outputs, ignore_errors=True)
        inputs.mkdir(parents=True)
        for case in val_keys:
            for image in raw.glob(f"{case}_*.nii.gz"):
                shutil.copy2(image, inputs / image.name)
        command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(outputs),
                   "-d", str(args.dataset_id), "-c", CONFIGURATION, "-f", "0", "-tr", MBLS,
                   "-chk", CALIBRATED_CHECKPOINT, "--save_probabilities", "-device", device.type]
        if device.type == "cpu":
            command += ["-npp", "0", "-nps", "0"]
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True,
                              timeout=max(120.0, report.budget.left() + 60))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, command, proc.stdout, proc.stderr)
        predicted = sorted(p.name for p in outputs.glob("*.nii.gz"))
        probabilities = sorted(outputs.glob("*.npz"))
        if len(predicted) != len(val_keys) or len(probabilities) != len(val_keys):
            raise RuntimeError(f"nnUNetv2_predict exited 0 but wrote {len(predicted)} segmentations and "
                               f"{len(probabilities)} probability files for {len(val_keys)} inputs; stdout tail: "
                               f"{proc.stdout[-1500:]}")
        report.data["pipeline"].append({**pred_what, "item": "predict", "wall_s": wall, "num_cases": len(val_keys),
                                        "command": shlex.join(command),
                                        "nnUNet_compile": os.environ.get("nnUNet_compile")})
    except Exception as error:  # noqa: BLE001
        report.error("pipeline", error, item="predict", **pred_what)


# ----------------------------------------------------------------------------------------------------------
# markdown


def render_markdown(data: dict) -> str:
    dry = data["mode"] == "dry-run"
    gpu = data["machine"].get("gpu", "no GPU")
    lines = [f"# gpu_check: nnunet-mbls on {data['device']}" + (" (dry run: CPU, toy sizes)" if dry else f" ({gpu})"),
             "", f"Command: `{data['command']}`", "",
             f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch {data['machine']['torch']}, "
             f"{gpu}; started {data['started_utc']}; {data['elapsed_s']} s of the {data['budget_s']:g} s budget.", "",
             f"Targets: MbLS <= {TARGETS['mbls']}x DC+CE time and memory, every other loss <= "
             f"{TARGETS['other_losses']}x, trainer step <= {TARGETS['trainer_step']}x the stock trainer's time.", ""]
    if dry:
        lines += ["Dry run: CPU numbers at toy sizes check the code paths only; they say nothing about the "
                  "GPU targets.", ""]

    lines += ["## Losses: forward + backward under autocast, against nnU-Net's DC_and_CE_loss", "",
              "Median of the timed rounds (warm-up excluded); peak extra memory of one call; ratio = loss / DC_and_CE "
              "in the same case.", ""]
    cases: dict[tuple, list[dict]] = {}
    for row in data["losses"]:
        cases.setdefault((row["dim"], row["classes"], row["dtype"]), []).append(row)
    skipped_cases: dict[tuple, list[dict]] = {}
    for entry in data["skipped"]:
        if entry["part"] == "losses" and "dim" in entry:  # (a whole part not run is listed at the end)
            skipped_cases.setdefault((entry["dim"], entry["classes"], entry["dtype"]), []).append(entry)
    for key in sorted(set(cases) | set(skipped_cases), key=lambda k: (k[0] != "3d", k[1], list(DTYPES).index(k[2]))):
        rows, skips = cases.get(key, []), skipped_cases.get(key, [])
        shape = (rows or skips)[0]["shape"]
        scales = f", {rows[0]['scales']} deep-supervision scales" if rows else ""
        lines += [f"### {key[0]} {shape}, {key[2]}{scales}", ""]
        if not rows:
            lines += [f"Not run: {skips[0]['reason'].splitlines()[0]}", ""]
            continue
        table = []
        for r in rows:
            table.append([r["loss"], 1000 * r["time_s"], ratio(r["time_ratio"]), r["memory_bytes"] / MiB,
                          ratio(r["memory_ratio"]), "anchor" if r["target_ratio"] is None else f"<= {r['target_ratio']}x",
                          verdict(r)])
        for s in skips:
            for name in s["losses"]:
                table.append([name, "–", "–", "–", "–", "", f"{s['kind']}: {s['reason'].splitlines()[0][:160]}"])
        lines += [markdown_table(["loss", "fwd+bwd (ms)", "time / DC+CE", "peak extra (MiB)", "memory / DC+CE",
                                  "target", "meets target (time, memory)"], table), ""]

    setup = data["setup"]
    patch = next((r["batch_shape"] for r in data["trainer_steps"]), None)
    lines += [f"## Trainer steps: {MBLS} against {STOCK} ({CONFIGURATION}" + (f", batch {tuple(patch)}" if patch else "")
              + ")", "", "Same initial weights and batches; median of the timed rounds, warm-up (and compilation) "
              "excluded; nnU-Net's autocast/GradScaler on CUDA.", ""]
    table = [[r["step"], r["compile"], r["trainer"], "yes" if r["compiled"] else "no", r["time_s"],
              ratio(r["time_ratio"]), r["memory_bytes"] / MiB, ratio(r["memory_ratio"]),
              "anchor" if r["target_ratio"] is None else f"<= {r['target_ratio']}x time",
              "" if r["target_ratio"] is None else "yes" if r["meets_time_target"] else "NO",
              sum(r["warmup_s"])]
             for r in data["trainer_steps"]]
    table += [[e.get("step", "all"), e.get("compile", ""), f"{STOCK}, {MBLS}", "–", "–", "–", "–", "–", "", f"{e['kind']}: "
               f"{e['reason'].splitlines()[0][:160]}", "–"] for e in data["skipped"] if e["part"] == "trainer_steps"]
    if table:
        lines += [markdown_table(["step", "nnUNet_compile", "trainer", "compiled", "median (s)", "time / stock",
                                  "peak extra (MiB)", "memory / stock", "target", "meets target", "warm-up (s)"],
                                 table), ""]

    lines += ["## Calibration step and calibrated prediction (wall time)", ""]
    table = [[r["item"], r["what"], r["wall_s"],
              f"T = {r['temperature']:.4g}, {r['num_cases']} cases" if r["item"] == "calibrate"
              else f"{r['num_cases']} cases"] for r in data["pipeline"]]
    table += [[e.get("item", ""), e.get("what", ""), "–", f"{e['kind']}: {e['reason'].splitlines()[0][:160]}"]
              for e in data["skipped"] if e["part"] == "pipeline"]
    if table:
        lines += [markdown_table(["item", "what", "wall (s)", "details"], table), ""]
    if setup or any(e["part"] == "setup" for e in data["skipped"]):
        lines += ["Setup (not targets): " + "; ".join(f"{r['what']}: {r['wall_s']:.1f} s" for r in setup), ""]

    if data["skipped"]:
        lines += ["## Not run, and why", ""]
        for e in data["skipped"]:
            what = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("part", "kind", "reason", "traceback"))
            lines.append(f"- {e['part']} ({what}): {e['kind']}: {e['reason'].splitlines()[0][:300]}")
        lines.append("")
    return "\n".join(lines)


def ratio(value: float | None) -> object:
    return "–" if value is None else f"{value:.3f}x"


def verdict(row: dict) -> str:
    if row["target_ratio"] is None or row["time_ratio"] is None:
        return ""
    return ", ".join("yes" if row[k] else "NO" for k in ("meets_time_target", "meets_memory_target"))


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes (< 2 minutes)")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="soft time budget in seconds: later parts are skipped as 'time budget' (default 420)")
    parser.add_argument("--workdir", help="nnU-Net root folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--dataset-id", type=int, default=988)
    parser.add_argument("--dims", nargs="+", choices=["3d", "2d"], default=["3d", "2d"])
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--losses", nargs="+", help="subset of nnunet_mbls.losses.LOSSES (default: all)")
    parser.add_argument("--repeats", type=int, help="timed loss rounds (default 10; dry run 2)")
    parser.add_argument("--warmup", type=int, help="untimed loss calls first (default 2; dry run 1)")
    parser.add_argument("--trainer-iterations", type=int, help="timed trainer rounds (default 10; dry run 2)")
    parser.add_argument("--trainer-warmup", type=int, help="untimed steps per trainer first (default 3; dry run 1)")
    parser.add_argument("--shape", type=int, nargs=3, help="synthetic case shape z y x (default 96 128 128; dry run 16 24 24)")
    parser.add_argument("--cases", type=int, help="synthetic cases (>= 5 for nnU-Net's 5-fold split; default 6)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads here and OMP_NUM_THREADS of the nnU-Net subprocesses (default: torch's "
                             "choice; dry run 1, since OpenMP threads spin-waiting on a shared CPU slow toy sizes 2x)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["losses", "trainer", "pipeline", "compile"],
                        help="parts not to run (recorded as skipped)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    mode = "dry-run" if args.dry_run else "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    cfg = dict(MODES[mode])
    for key in ("repeats", "warmup", "trainer_iterations", "trainer_warmup", "shape", "cases"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    threads = args.threads or (1 if args.dry_run else None)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for nnU-Net's subprocesses and spawned workers
    cfg["threads"] = torch.get_num_threads()
    budget = Budget(args.budget_s, CUDA_NEEDS_S if cuda else {})
    report = Report(Path(args.out), args, mode, device, budget)
    report.data["settings"] = {**cfg, "loss_shapes": {d: [b, list(s)] for d, (b, s) in cfg["loss_shapes"].items()},
                               "dims": args.dims, "classes": args.classes, "dtypes": args.dtypes,
                               "dataset_id": args.dataset_id, "configuration": CONFIGURATION}

    if not args.dry_run and not torch.cuda.is_available():
        reason = "cuda not available (torch.cuda.is_available() is False); use --dry-run for the CPU check"
        for part in ("losses", "trainer_steps", "pipeline"):
            report.skip(part, reason, what="all")
        report.save()
        print(render_markdown(report.data))
        return report.data
    if cuda:  # as nnUNetv2_train does
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True

    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            run_parts(report, cfg, device, args, Path(args.workdir or tmp))
    except Exception as error:  # noqa: BLE001 - whatever the parts did not catch still ends in the report
        report.error("script", error, what="outside the parts")
    os.environ["nnUNet_compile"] = "f"
    report.save()
    print("\n" + render_markdown(report.data), flush=True)
    print(f"\n[gpu_check] {budget.elapsed():.1f} s; wrote {Path(args.out) / 'gpu_check.json'} and "
          f"{Path(args.out) / 'gpu_check.md'}", flush=True)
    return report.data


def run_parts(report: Report, cfg: dict, device: torch.device, args: argparse.Namespace, root: Path) -> None:
    import bench_trainer

    env = bench_trainer.set_nnunet_env(root)  # before nnunetv2 is imported (it reads the paths then)
    report.save()

    if "losses" in args.skip:
        report.skip("losses", "--skip losses", what="all")
    else:
        report.timed("losses", losses_part, report, cfg, device, args)

    # trainer = steps with nnUNet_compile=f, compile = the same with nnUNet_compile=t
    where = {"trainer": ("trainer_steps", {"compile": "off"}), "compile": ("trainer_steps", {"compile": "on"}),
             "pipeline": ("pipeline", {})}
    parts = [p for p in ("trainer", "pipeline", "compile") if p not in args.skip]
    for p in ("trainer", "pipeline", "compile"):
        if p in args.skip:
            report.skip(where[p][0], f"--skip {p}", what="all", **where[p][1])
    not_ready = report.timed("setup", prepare_dataset, report, cfg, args, env) if parts else None
    if not_ready:  # the parts that need the dataset: 'time budget' when that is why, else what failed
        for p in parts:
            report.skip(where[p][0], not_ready, what="all", **where[p][1])
    else:
        batches = None
        if "trainer" in parts:
            batches = report.timed("trainer_steps_compile_off", trainer_steps_part, report, cfg, device, args,
                                   compile_on=False, batches=batches)
        if "pipeline" in parts:
            report.timed("pipeline", pipeline_part, report, cfg, device, args, root)
        if "compile" in parts:
            report.timed("trainer_steps_compile_on", trainer_steps_part, report, cfg, device, args,
                         compile_on=True, batches=batches)


if __name__ == "__main__":
    main()
