"""Folder evaluation: calibration and segmentation metrics of nnU-Net probability files.

Input: a folder of nnU-Net ``.npz`` files (``probabilities`` (C, *spatial) float32, written by
``nnUNetv2_train --npz`` or ``nnUNetv2_predict --save_probabilities``) with their ``.pkl``
properties, and a folder of reference segmentations. Cases are streamed one at a time, so memory
holds one case plus fixed-size metric sums whatever the number of cases; with worker processes
(``num_processes``) each worker holds one case and this process merges their results in case order.

Aggregation: ``mean`` is per case, then the mean over cases (the paper's); ``pooled`` sums all
selected voxels of all cases into one accumulator. Dice uses nnU-Net's own tp/fp/fn code; HD95
(mm, image spacing) uses MONAI. A structure that is empty in the reference or in the prediction
gets NaN for that case and is counted under ``empty_reference`` / ``empty_prediction``.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .calibration.metrics import METRIC_KEYS, CalibrationAccumulator, aggregate
from .calibration.regions import region_mask
from .calibration.temperature import apply_temperature
from .errors import InputError
from .geometry import GeometryError, crop_box, find_plans_file, transpose_forward_of
from .probabilities import ProbabilityFileError, check_probabilities
from .probabilities import load_probabilities as _load_probabilities

REGIONS = ("fg", "all", "boundary")


class EvaluationError(InputError):
    """A case cannot be evaluated; the message names the case and the problem."""


@dataclass
class LabelInfo:
    """Labels of a dataset: class count (softmax channels), foreground labels, ignore label."""

    num_classes: int
    ignore_label: int | None
    names: dict[int, str]

    @classmethod
    def from_dataset_json(cls, dataset_json: dict) -> "LabelInfo":
        labels = dataset_json["labels"]
        if any(not isinstance(v, int) for v in labels.values()):
            raise EvaluationError(
                "dataset.json declares region-based labels; calibration metrics need mutually exclusive integer labels"
            )
        ignore = labels.get("ignore")
        names = {v: k for k, v in labels.items() if k != "ignore"}
        return cls(num_classes=len(names), ignore_label=ignore, names=names)


def find_dataset_json(pred_folder: Path, ref_folder: Path) -> Path | None:
    """dataset.json next to the predictions (nnUNetv2_predict, trainer folders) or the references."""
    for candidate in (
        pred_folder / "dataset.json",
        pred_folder.parent / "dataset.json",
        pred_folder.parent.parent / "dataset.json",
        ref_folder.parent / "dataset.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def reader_for(dataset_json: dict, example_file: Path):
    """nnU-Net's image reader for the reference files (dataset.json's reader override, else by file ending)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = dict(dataset_json, file_ending=reference_ending(example_file))
    return determine_reader_writer_from_dataset_json(dataset_json, str(example_file), verbose=False)()


def reference_ending(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nrrd", ".mha", ".nii", ".png", ".tif", ".tiff", ".npz"):
        if name.endswith(ending):
            return ending
    return path.suffix


def _some(names: list[str], limit: int = 10) -> str:
    """``names`` for a message: the first ``limit`` and how many more."""
    return str(names[:limit])[:-1] + (f", ... ({len(names) - limit} more)]" if len(names) > limit else "]")


def match_cases(ref_folder: Path, pred_folder: Path, chill: bool = False) -> dict[str, tuple[Path, Path]]:
    """case id -> (reference file, npz file); errors name cases that are only on one side.

    Probabilities without a reference are always an error. References without probabilities are an
    error unless ``chill`` (as nnU-Net's ``nnUNetv2_evaluate_folder -chill``): then only the predicted
    cases are evaluated, e.g. one fold's ``validation/`` against all of ``gt_segmentations``.
    """
    if not pred_folder.is_dir():
        raise EvaluationError(f"prediction folder {pred_folder} does not exist")
    if not ref_folder.is_dir():
        raise EvaluationError(f"reference folder {ref_folder} does not exist")
    preds = {p.name[: -len(".npz")]: p for p in sorted(pred_folder.glob("*.npz"))}
    unreadable = [p for p in preds.values() if not p.is_file()] + [
        r for r in sorted(ref_folder.iterdir()) if r.is_symlink() and not r.exists()]
    if unreadable:
        raise EvaluationError(
            f"{unreadable[0]} is not a readable file: a symbolic link that loops or points nowhere, or a folder "
            f"({len(unreadable)} such entries); remove it or point it at the case's file")
    if not preds:
        raise EvaluationError(
            f"no .npz probability files in {pred_folder}: run nnUNetv2_train ... --npz (or --val --npz) or "
            f"nnUNetv2_predict ... --save_probabilities first"
        )
    refs = {}
    for r in sorted(ref_folder.iterdir()):
        if r.is_file() and not r.name.startswith(".") and not r.name.endswith((".json", ".pkl")):
            refs[r.name[: -len(reference_ending(r))]] = r
    missing = sorted(set(preds) - set(refs))
    if missing:
        raise EvaluationError(
            f"cases {_some(missing)} have probabilities in {pred_folder} but no reference in {ref_folder}"
        )
    unpredicted = sorted(set(refs) - set(preds))
    if unpredicted and not chill:
        raise EvaluationError(
            f"references {_some(unpredicted)} ({len(unpredicted)} of {len(refs)}) have no probabilities (.npz) in "
            f"{pred_folder}: the predictions are incomplete (an interrupted nnUNetv2_predict?) or cover a subset "
            f"(one fold's validation cases); to evaluate only the {len(preds)} predicted cases pass --chill "
            f"(chill=True; as nnUNetv2_evaluate_folder -chill)"
        )
    return {case: (refs[case], preds[case]) for case in preds}


def load_probabilities(case: str, npz_file: Path) -> tuple[np.ndarray, dict]:
    """:func:`nnunet_mbls.probabilities.load_probabilities`, raising :class:`EvaluationError`."""
    try:
        return _load_probabilities(case, npz_file)
    except ProbabilityFileError as e:
        raise EvaluationError(str(e)) from e


def read_reference(case: str, reader, ref_file: Path) -> tuple[np.ndarray, dict]:
    """(*spatial) int64 reference labels and the image properties (spacing) of one case."""
    try:
        seg, seg_properties = reader.read_seg(str(ref_file))
    except Exception as e:
        raise EvaluationError(f"case {case}: cannot read the reference {ref_file} ({type(e).__name__}: {e})") from e
    return seg[0].astype(np.int64), seg_properties


def check_case(case: str, probs: np.ndarray, ref: np.ndarray, labels: LabelInfo) -> None:
    """EvaluationError unless ``probs`` are probabilities of the reference's shape and the dataset's classes, and the
    reference holds only declared labels."""
    try:
        check_probabilities(case, probs, labels.num_classes, ref.shape)
    except ProbabilityFileError as e:
        raise EvaluationError(str(e)) from e
    allowed = set(labels.names) | ({labels.ignore_label} if labels.ignore_label is not None else set())
    present = set(np.unique(ref).tolist())
    if not present <= allowed:
        raise EvaluationError(
            f"case {case}: reference contains labels {sorted(present - allowed)} that dataset.json does not declare "
            f"(declared: {sorted(allowed)})"
        )


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, labels: LabelInfo, spacing) -> dict:
    """Per-class Dice (nnU-Net's tp/fp/fn) and HD95 in mm (MONAI); NaN where a side is empty."""
    from monai.metrics import compute_hausdorff_distance
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    ignore = ref == labels.ignore_label if labels.ignore_label is not None else None
    dice, hd95, empty_ref, empty_pred = {}, {}, [], []
    for label, name in labels.names.items():
        if label == 0:
            continue
        mask_ref, mask_pred = ref == label, pred == label
        if ignore is not None:
            mask_pred = mask_pred & ~ignore
        tp, fp, fn, _ = compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore)
        dice[name] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else float("nan")
        if not mask_ref.any():
            empty_ref.append(name)
        if not mask_pred.any():
            empty_pred.append(name)
        if mask_ref.any() and mask_pred.any():
            with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                value = compute_hausdorff_distance(
                    torch.from_numpy(mask_pred)[None, None], torch.from_numpy(mask_ref)[None, None],
                    include_background=True, percentile=95, spacing=[float(s) for s in spacing],
                )
            hd95[name] = float(value.item())
        else:
            hd95[name] = float("nan")
    return {"dice": dice, "hd95": hd95, "empty_reference": empty_ref, "empty_prediction": empty_pred}


def evaluate_folder(
    ref_folder: str | os.PathLike,
    pred_folder: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_json: dict | None = None,
    region: str = "fg",
    temperature: float | None = None,
    n_bins: int = 15,
    boundary_width: int = 2,
    progress: bool = True,
    on_case: Callable[[str, Any], None] | None = None,
    chill: bool = False,
    plans: dict | str | os.PathLike | None = None,
    fit_region: str = "all",
    case_reduce: Callable[[str, np.ndarray, np.ndarray, np.ndarray], Any] | None = None,
    num_processes: int | None = None,
) -> dict:
    """Evaluate every ``.npz`` in ``pred_folder`` against ``ref_folder``; see the module docstring.

    ``pred_folder`` may be a list of folders (e.g. the validation folders of several folds: their cases are
    evaluated together, ``pooled`` over all of them); a case must not appear in two of them.
    ``temperature``: apply normalize(p ** (1/T)) before every metric. ``case_reduce(case, probs, ref, fit_mask)``
    (a picklable function, e.g. a ``functools.partial`` of a module-level one) runs where each case is evaluated,
    with the voxels of ``fit_region``, and ``on_case(case, its value)`` is called in this process in case order
    (used to collect a temperature-fit subsample in the same pass: workers send back the reduced value, not
    the case's arrays); pass both or neither.
    ``num_processes``: cases are evaluated in that many worker processes ('spawn', as nnU-Net's pools), results
    taken in case order, so the result is identical to the serial one (each case's metrics are computed with one
    torch thread in either mode: torch's parallel sums depend on the thread count). None: nnU-Net's
    ``default_num_processes`` (``nnUNet_def_n_proc``, default 8) but at most the number of cases and of CPUs, and
    1 (this process) when the ``.npz`` files total less than :data:`PARALLEL_MIN_BYTES`, where starting the
    workers would cost more than they save; 1: in this process.
    ``chill``: references without probabilities are skipped instead of being an error (see :func:`match_cases`).
    ``plans``: the model's plans (dict or plans.json), whose ``transpose_forward`` maps nnU-Net's crop box to the
    reference's axis order (see :mod:`nnunet_mbls.geometry`); default: the plans.json nnU-Net writes next to the
    predictions (``nnUNetv2_predict``'s output folder, or the trainer folder above ``fold_k/validation``).
    Every problem raises :class:`EvaluationError` naming the case; nothing is written here, so a caller that
    writes the result afterwards leaves no partial output behind.
    Returns ``{"per_case": {...}, "mean": {...}, "pooled": {...}, "reliability": {...}, ...}``.
    """
    if (on_case is None) != (case_reduce is None):
        raise ValueError("pass on_case and case_reduce together (on_case receives case_reduce's value), or neither")
    for name, value in (("region", region), ("fit_region", fit_region)):
        if value not in REGIONS:
            raise ValueError(f"{name}={value!r} is invalid: choose one of {REGIONS}")
    ref_folder = Path(ref_folder)
    pred_folders = [Path(pred_folder)] if isinstance(pred_folder, (str, os.PathLike)) else [Path(f) for f in pred_folder]
    cases: dict[str, tuple[Path, Path, tuple[int, ...] | None]] = {}
    for folder in pred_folders:
        transpose_forward = resolve_transpose_forward(plans, folder)
        for case, (ref_file, npz_file) in match_cases(ref_folder, folder, chill=chill or len(pred_folders) > 1).items():
            if case in cases:
                raise EvaluationError(f"case {case} has probabilities in {cases[case][1].parent} and in {folder}; "
                                      f"pass folders with distinct cases (one per fold)")
            cases[case] = (ref_file, npz_file, transpose_forward)
    if dataset_json is None:
        found = find_dataset_json(pred_folders[0], ref_folder)
        if found is None:
            raise EvaluationError(
                f"no dataset.json found next to {pred_folders[0]} or {ref_folder}; pass it with -djfile"
            )
        import json

        dataset_json = json.loads(found.read_text())
    labels = LabelInfo.from_dataset_json(dataset_json)
    reader = reader_for(dataset_json, next(iter(cases.values()))[0])
    job = CaseJob(labels, reader, region, temperature, n_bins, boundary_width, fit_region, case_reduce)
    pooled = CalibrationAccumulator(labels.num_classes, n_bins)
    per_case: dict[str, dict] = {}
    tasks = [(case, *files) for case, files in cases.items()]
    processes = resolve_num_processes(num_processes, [npz_file for _, npz_file, _ in cases.values()])
    # the generator first in zip, so that it runs to its end (the progress bar closes at N/N, the pool is released)
    for (metrics, states, extra), case in zip(evaluate_cases(job, tasks, processes, progress), cases):
        accumulator = CalibrationAccumulator(labels.num_classes, n_bins)
        accumulator.load_state_tensors([torch.from_numpy(s) for s in states])
        pooled += accumulator
        per_case[case] = metrics
        if on_case is not None:
            on_case(case, extra)
    return summarise(per_case, pooled, labels, region, temperature)


#: the default ``num_processes`` of :func:`evaluate_folder` evaluates in this process below this much ``.npz`` data:
#: a spawned worker first imports torch, nnU-Net's metrics and MONAI (whose package import alone loads torchvision
#: and torch._dynamo), 3-8 s of CPU on the 2-core machine of benchmarks/bench_evaluate_parallel.py, which evaluates
#: about 50 MiB of compressed probabilities per second and core: 2 workers only pay from several hundred MiB on.
PARALLEL_MIN_BYTES = 512 * 2**20


def resolve_num_processes(num_processes: int | None, npz_files: Sequence[Path]) -> int:
    """Worker processes for the cases of ``npz_files``: ``num_processes`` (at most one per case), else the default
    described in :func:`evaluate_folder`."""
    if num_processes is None:
        from nnunetv2.configuration import default_num_processes

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if sum(f.stat().st_size for f in npz_files) < PARALLEL_MIN_BYTES:
            return 1
        num_processes = min(default_num_processes, cpus)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} is invalid: pass an integer >= 1 (1 = in this process) "
                         f"or None for nnU-Net's default_num_processes")
    return max(1, min(num_processes, len(npz_files)))


@dataclass
class CaseJob:
    """What every case of one :func:`evaluate_folder` call is evaluated with (sent to the workers with each case);
    ``case_reduce``: see :func:`evaluate_folder`."""

    labels: LabelInfo
    reader: Any
    region: str
    temperature: float | None
    n_bins: int
    boundary_width: int
    fit_region: str
    case_reduce: Callable | None


def evaluate_case(job: CaseJob, case: str, ref_file: Path, npz_file: Path, transpose_forward) -> tuple[dict, list, Any]:
    """One case: (metrics, calibration accumulator states as numpy arrays, ``case_reduce``'s value or None)."""
    probs, properties = load_probabilities(case, npz_file)
    ref, seg_properties = read_reference(case, job.reader, ref_file)
    labels = job.labels
    check_case(case, probs, ref, labels)
    if job.temperature is not None:
        probs = apply_temperature(probs, job.temperature)
    try:
        box = crop_box(properties, transpose_forward, ref.shape)
    except GeometryError as e:
        raise EvaluationError(f"case {case}: {e}") from e
    mask = region_mask(ref, job.region, labels.ignore_label, box, job.boundary_width)
    accumulator = CalibrationAccumulator(labels.num_classes, job.n_bins)
    target = np.where(mask, ref, 0)
    accumulator.update(torch.from_numpy(probs), torch.from_numpy(target), torch.from_numpy(mask))
    pred = probs.argmax(0)
    metrics = {
        **accumulator.compute(),
        **segmentation_metrics(pred, ref, labels, seg_properties["spacing"]),
    }
    extra = None
    if job.case_reduce is not None:
        fit_mask = region_mask(ref, job.fit_region, labels.ignore_label, box, job.boundary_width)
        extra = job.case_reduce(case, probs, ref, fit_mask)
    return metrics, [s.numpy() for s in accumulator.state_tensors()], extra


def load_case_dependencies() -> None:
    """Import what every case needs (MONAI, nnU-Net's metrics) once, before the first case is timed."""
    import monai.metrics  # noqa: F401
    import nnunetv2.evaluation.evaluate_predictions  # noqa: F401


@contextmanager
def one_torch_thread():
    """torch.set_num_threads(1) inside, the previous count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def evaluate_cases(job: CaseJob, tasks: list[tuple], num_processes: int, progress: bool):
    """Yield :func:`evaluate_case` of every task (case, ref_file, npz_file, transpose_forward), in task order.

    ``num_processes`` > 1: in a 'spawn' pool (that of an enclosing :func:`case_workers` block, else one for this
    call) whose workers import the case dependencies before the progress bar starts, so the bar's first case
    costs what the others do."""
    desc = f"evaluating ({job.region})"
    if num_processes <= 1:
        load_case_dependencies()
        with one_torch_thread():
            for task in tqdm(tasks, desc=desc, disable=not progress):
                yield evaluate_case(job, *task)
        return
    if _SHARED_WORKERS:  # an enclosing case_workers() block: its pool, started by the first call that needs one
        slot = _SHARED_WORKERS[-1]
        if slot.get("pool") is None:
            slot["pool"] = start_case_workers(num_processes)
        pool = slot["pool"]
        yield from tqdm(pool.imap(_evaluate_in_worker, [(job, task) for task in tasks]), total=len(tasks), desc=desc,
                        disable=not progress)
        return
    with start_case_workers(num_processes) as pool:
        yield from tqdm(pool.imap(_evaluate_in_worker, [(job, task) for task in tasks]), total=len(tasks), desc=desc,
                        disable=not progress)


def start_case_workers(num_processes: int):
    """A 'spawn' pool (as nnU-Net's) of ``num_processes`` case workers, returned once each has imported torch,
    nnU-Net's metrics and MONAI (or after 300 s): one torch thread per worker."""
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    pool = context.Pool(num_processes, initializer=_init_worker, initargs=(ready,))
    deadline = time.monotonic() + 300  # a worker that never reports only delays the progress bar, nothing else
    for _ in range(num_processes):
        try:
            ready.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
    return pool


#: open :func:`case_workers` blocks: {"pool": the shared pool or None until a call needs one}
_SHARED_WORKERS: list[dict] = []


@contextmanager
def case_workers():
    """Inside this block (also as a decorator), :func:`evaluate_folder` calls that use worker processes share one
    pool, started by the first such call (with its number of processes) and closed when the outermost block ends:
    the calibration step's two passes (and an ensemble's folds) start their workers once. Nested blocks share
    the outermost one's pool."""
    if _SHARED_WORKERS:
        yield
        return
    slot: dict = {"pool": None}
    _SHARED_WORKERS.append(slot)
    try:
        yield
    finally:
        _SHARED_WORKERS.remove(slot)
        if slot["pool"] is not None:
            slot["pool"].terminate()
            slot["pool"].join()


def _init_worker(ready) -> None:
    torch.set_num_threads(1)
    try:
        load_case_dependencies()
    except Exception:  # noqa: BLE001 -- the first case raises it again, with its traceback, in the main process
        pass
    ready.put(os.getpid())


def _evaluate_in_worker(job_and_task: tuple) -> tuple[dict, list, Any]:
    job, task = job_and_task
    return evaluate_case(job, *task)


def resolve_transpose_forward(plans, pred_folder: Path) -> tuple[int, ...] | None:
    """``transpose_forward`` of the given plans, else of the plans.json next to the predictions, else None."""
    if plans is None:
        plans = find_plans_file(pred_folder, pred_folder.parent, pred_folder.parent.parent)
        if plans is None:
            return None
    try:
        return transpose_forward_of(plans)
    except GeometryError as e:
        raise EvaluationError(str(e)) from e


def summarise(per_case: dict, pooled: CalibrationAccumulator, labels: LabelInfo, region: str, temperature) -> dict:
    cases = list(per_case.values())
    foreground = [name for label, name in sorted(labels.names.items()) if label != 0]
    mean = aggregate(cases, METRIC_KEYS)
    for key in ("dice", "hd95"):
        per_class = aggregate([c[key] for c in cases], foreground)
        per_class.pop("n_voxels"), per_class.pop("n_cases")
        mean[key] = per_class
    for key in ("empty_reference", "empty_prediction"):
        mean[key] = {name: sum(name in c[key] for c in cases) for name in foreground}
    return {
        "region": region,
        "temperature": temperature,
        "aggregation": {
            "mean": "metric per case, then mean (and std) over cases: the paper's aggregation",
            "pooled": "all selected voxels of all cases in one accumulator",
        },
        "num_cases": len(cases),
        "mean": mean,
        "pooled": pooled.compute(),
        "reliability": {k: v.tolist() for k, v in pooled.reliability().items()},
        "per_case": per_case,
    }
