"""Evaluating cases in worker processes: a 'spawn' pool (as nnU-Net's), results taken in case order.

Each case is evaluated with one torch thread, in a worker or in this process (torch's parallel sums depend on the
thread count), so the result is identical whatever the number of processes. Inside a :func:`case_workers` block
the :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder` calls share one pool.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

# below this much .npz data starting workers costs more than they save (docs/BENCHMARKS.md, "Parallel evaluation")
from ...defaults import PARALLEL_MIN_BYTES
from .case import CaseJob, evaluate_case, load_case_dependencies


def resolve_num_processes(num_processes: int | None, npz_files: Sequence[Path]) -> int:
    """The number of worker processes for the cases of ``npz_files``.

    Args:
        num_processes: the number asked for (1: this process), or None for the default: nnU-Net's
            ``default_num_processes`` (``nnUNet_def_n_proc``, default 8) but at most the number of CPUs, and 1
            when the ``.npz`` files total less than :data:`~nnunet_mbls.defaults.PARALLEL_MIN_BYTES`.
        npz_files: the ``.npz`` file of every case.

    Returns:
        ``num_processes`` (or the default), at most one per case and at least 1.

    Raises:
        ValueError: ``num_processes`` is not None and not an integer >= 1 (a bool counts as invalid).
    """
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
    """Evaluate every task, in this process or in worker processes.

    Args:
        job: the settings of the folder evaluation.
        tasks: ``(case, ref_file, npz_file, transpose_forward)`` per case.
        num_processes: 1: in this process; > 1: in a 'spawn' pool (that of an enclosing :func:`case_workers`
            block, else one for this call) whose workers import the case dependencies before the progress bar
            starts, so the bar's first case costs what the others do.
        progress: show a progress bar.

    Yields:
        :func:`~nnunet_mbls.calibration.evaluation.case.evaluate_case`'s value for every task, in task order. Exhaust the
        generator: a pool started for this call is released at its end.

    Raises:
        EvaluationError: from the first case that cannot be evaluated (raised again here from a worker).
    """
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
    """Start a 'spawn' pool (as nnU-Net's) of case workers, one torch thread per worker.

    Args:
        num_processes: the number of workers.

    Returns:
        The ``multiprocessing`` pool, once each worker has imported torch, nnU-Net's metrics and MONAI (or after
        300 s: a worker that never reports only delays the progress bar). The caller closes it.
    """
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
    """Inside this block (also as a decorator), :func:`~nnunet_mbls.calibration.evaluation.evaluate_folder` calls that use
    worker processes share one pool, started by the first such call (with its number of processes) and closed
    when the outermost block ends: the calibration step's two passes (and an ensemble's folds) start their
    workers once. Nested blocks share the outermost one's pool."""
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
