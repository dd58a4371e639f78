"""Helpers shared by the benchmark scripts: timing, peak extra memory, machine info, tables, JSON.

Peak extra memory on the CPU is measured with ``torch.profiler`` (``profile_memory=True``): every
allocation and free of a torch CPU tensor is recorded with its size, and the peak of their running
sum is the largest amount of tensor memory the measured call held on top of what existed before it.
It counts exactly the tensors the call creates (inputs that already exist cost nothing), is
deterministic, needs no separate process, and is not blurred by glibc keeping freed pages or by other
jobs on the machine. Checked against ``ru_maxrss`` in a fresh process without the profiler:
``F.cross_entropy`` forward+backward on (2, 8, 128, 128, 128) float32 logits gives 384.0 MiB with the
profiler and a 384.1 MiB RSS peak increase. Memory that is not a torch tensor (Python lists, numpy
arrays) would be missed; the code measured here keeps all bulk data in torch tensors.
On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

MiB = 2**20


def machine_info() -> dict:
    """CPU model, core count, torch version, threads, load average and (if any) the GPU."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of ``fn``.

    Wall time: CUDA events on a GPU, perf_counter on the CPU. CPU time (``time.process_time``, all
    threads of this process) is a second view that is less sensitive to other jobs taking the cores.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        cpu0 = time.process_time()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0, time.process_time() - cpu0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0


def paired_rounds(steps: dict[str, Callable[[], object]], anchor: str, rounds: int, device: torch.device) -> dict:
    """Time every step once per round, order rotated per round; per step: wall and CPU times, the
    medians over rounds of the within-round ratios to ``anchor`` (wall and CPU) and the ratio of the
    fastest wall times. CPU time counts all threads of this process, including OpenMP threads
    spin-waiting between parallel regions, so with several threads it is only a rough second view."""
    names = list(steps)
    out = {name: {"wall_s": [], "cpu_s": [], "wall_ratios": [], "cpu_ratios": []} for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        measured = {name: time_once(steps[name], device) for name in order}
        for name in names:
            (wall, cpu), (wall_a, cpu_a) = measured[name], measured[anchor]
            out[name]["wall_s"].append(wall)
            out[name]["cpu_s"].append(cpu)
            out[name]["wall_ratios"].append(wall / wall_a)
            out[name]["cpu_ratios"].append(cpu / cpu_a)
    for stats in out.values():
        stats.update(wall_median_s=median(stats["wall_s"]), cpu_median_s=median(stats["cpu_s"]),
                     wall_ratio=median(stats["wall_ratios"]), cpu_ratio=median(stats["cpu_ratios"]))
    for stats in out.values():  # ratio of the fastest rounds: robust to occasional interference
        stats["wall_min_ratio"] = min(stats["wall_s"]) / min(out[anchor]["wall_s"])
    return out


def timed_repeats(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> list[float]:
    """Wall times of up to ``repeats`` calls of ``fn``, stopping early (after at least one) once ``budget_s``
    seconds have been spent, so that very slow baselines at the largest sizes stay affordable."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        times.append(time_once(fn, device)[0])
    return times


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads) when given (default: torch's choice, one per core)."""
    if threads:
        torch.set_num_threads(threads)


def _cpu_allocations(prof) -> list[tuple[int, int]]:
    """(time ns, signed bytes) of every CPU allocation/free the profiler saw, in time order."""
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            out.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    return sorted(out)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated by one call of ``fn`` on top of what existed before it.

    What ``fn`` returns is kept until the measurement ends, so returned tensors count too.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    current = peak = 0
    for _, nbytes in _cpu_allocations(prof):
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:
                return "–"  # not measured for this row
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"raw numbers written to {path}")


def quiet_profiler_logs() -> None:
    """Silence Kineto's informational lines (set before torch starts the profiler)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
