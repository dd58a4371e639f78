"""Start-up cost of the ``nnunet-mbls`` commands, each in a fresh process.

Rows: ``python -c pass`` (the interpreter's own floor), ``nnunet-mbls --help``, ``env``, ``trainers`` (wall time
of the whole process, median of ``--repeats`` runs), and ``nnunet-mbls evaluate`` on a small generated folder of
3D cases (``_eval_cases.py``: ``--cases`` cases of ``--shape``, 4 classes), for which the progress bar is read
as it is written (``TQDM_MININTERVAL=0`` makes tqdm print every case) and timestamped:

* ``to 1st case``: process start until the bar shows case 1 done (imports, the first case, workers' start);
* ``1st case``: bar start (0/N) until case 1 is done; ``other cases``: the mean time per case after the first
  ((N/N time - 1/N time) / (N - 1)); a first case much slower than the others means a one-off cost (an import,
  a worker start-up) is paid inside the loop;
* ``total``: the whole process (it also writes the JSON and the reliability PNG).

``heavy imports``: which of torch, nnunetv2, monai the command imports (one extra run with
``PYTHONPROFILEIMPORTTIME=1``, the environment form of ``python -X importtime``).
When ``nnunet-mbls evaluate`` has ``-np``, it is timed with each value of ``--np`` (and without, the default).

    python benchmarks/bench_startup.py [--repeats 5] [--cases 6] [--shape 32 64 64] [--np 1 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_average, machine_info, markdown_table, save_json  # noqa: E402
from _eval_cases import make_eval_folder  # noqa: E402

HEAVY = ("torch", "nnunetv2", "monai")
NNUNET_MBLS = shutil.which("nnunet-mbls", path=str(Path(sys.executable).parent)) or "nnunet-mbls"
PROGRESS = re.compile(rb"(\d+)/(\d+) \[")


def wall_of(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.decode(errors='replace')[-2000:]}")
    return wall


def heavy_imports(cmd: list[str], env: dict) -> list[str]:
    """Top-level heavy packages the command imports (PYTHONPROFILEIMPORTTIME lines on stderr)."""
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=dict(env, PYTHONPROFILEIMPORTTIME="1"))
    names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def evaluate_timeline(cmd: list[str], env: dict) -> dict:
    """Timestamps (s after the start) of the progress bar's 0/N, 1/N and N/N, and of the process's exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(env, TQDM_MININTERVAL="0"))
    seen: dict[int, float] = {}
    total, tail, log = None, b"", []
    while True:
        chunk = os.read(proc.stderr.fileno(), 65536)
        now = time.perf_counter() - start
        if not chunk:
            break
        log.append(chunk)
        tail += chunk
        *parts, tail = re.split(rb"[\r\n]", tail)
        for part in parts:
            m = PROGRESS.search(part)
            if m:
                n, total = int(m.group(1)), int(m.group(2))
                seen.setdefault(n, now)
    proc.wait()
    end = time.perf_counter() - start
    if proc.returncode != 0 or total is None or not {0, 1, total} <= set(seen):
        raise RuntimeError(f"{' '.join(cmd)} (exit {proc.returncode}) did not show its progress:\n"
                           f"{b''.join(log).decode(errors='replace')[-2000:]}")
    return {"to_first_case_s": seen[1], "first_case_s": seen[1] - seen[0],
            "other_cases_s": (seen[total] - seen[1]) / max(1, total - 1), "total_s": end}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--np", type=int, nargs="*", default=[1, 2], help="-np values of evaluate (if it has -np)")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()

    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    print(f"machine: {machine_info()}")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "nnunet-mbls --help": [NNUNET_MBLS, "--help"],
        "nnunet-mbls env": [NNUNET_MBLS, "env"],
        "nnunet-mbls trainers": [NNUNET_MBLS, "trainers"],
    }
    results: dict[str, dict] = {}
    for name, cmd in commands.items():
        wall_of(cmd, env)  # warm the file cache
        walls = [wall_of(cmd, env) for _ in range(args.repeats)]
        results[name] = {"wall_s": walls, "median_s": statistics.median(walls), "heavy": heavy_imports(cmd, env)}
        print(f"{name}: median {results[name]['median_s']:.3f} s of {[round(w, 3) for w in walls]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        ref, pred = make_eval_folder(tmp, args.cases, tuple(args.shape))
        base = [NNUNET_MBLS, "evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(Path(tmp) / "out.json")]
        help_text = subprocess.run([NNUNET_MBLS, "evaluate", "--help"], capture_output=True, text=True).stdout
        has_np = re.search(r"\s-np\b", help_text) is not None
        variants = {"nnunet-mbls evaluate": base}
        if has_np:
            variants = {"nnunet-mbls evaluate (default -np)": base,
                        **{f"nnunet-mbls evaluate -np {n}": base + ["-np", str(n)] for n in args.np}}
        for name, cmd in variants.items():
            evaluate_timeline(cmd, env)  # warm-up
            runs = [evaluate_timeline(cmd, env) for _ in range(args.repeats)]
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            results[name] = {"runs": runs, "median_s": med["total_s"], **{f"median_{k}": v for k, v in med.items()},
                             "heavy": heavy_imports(cmd, env)}
            print(f"{name}: {', '.join(f'{k} {v:.2f}' for k, v in med.items())}", flush=True)

    rows = []
    for name, r in results.items():
        rows.append([name, r["median_s"], r.get("median_to_first_case_s", float("nan")),
                     r.get("median_first_case_s", float("nan")), r.get("median_other_cases_s", float("nan")),
                     ", ".join(r["heavy"]) or "none"])
    print(f"\nmedian of {args.repeats} fresh processes; evaluate: {args.cases} cases of {tuple(args.shape)}, 4 classes; "
          f"load average now {load_average()}")
    print(markdown_table(["command", "total s", "to 1st case s", "1st case s", "other cases s/case", "heavy imports"],
                         rows))
    save_json(args.json, {"machine": machine_info(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
