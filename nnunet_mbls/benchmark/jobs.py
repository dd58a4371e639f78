"""``benchmark --emit-jobs``: the grid as independent shell commands for any scheduler.

Each line of ``jobs.txt`` trains one cell with nnU-Net's own ``nnUNetv2_train`` (``--c`` so a resubmitted job
resumes; ``-num_gpus N`` for nnU-Net's DDP; no ``--npz``: the calibration statistics are streamed) and then runs our
calibration step (``nnunet-mbls calibrate --if-missing``: a no-op for our trainers, which calibrate themselves on
rank 0 after validation; for other trainers it validates once more, streaming the statistics). A cell that is trained but not calibrated (its calibration step failed)
gets only the calibrate command. ``jobs.sbatch`` is a SLURM array over the lines. Finished cells are left
out and listed in ``jobs_done.txt``, so emitting again after a partial run resubmits only the rest.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_text
from ..layout import FoldFolder
from .grid import Cell

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass
class SlurmOptions:
    gpus: int = 1
    time: str = "48:00:00"
    cpus: int = 12
    mem: str = "64G"
    partition: str | None = None


def job_command(cell: Cell, num_gpus: int = 1, device: str | None = None) -> str:
    """One self-contained line: nnU-Net paths of this shell, our trainer folder, train, calibrate.

    A cell whose training finished (``checkpoint_final.pth``) but whose calibration step is missing or
    failed gets only the calibrate command: nothing is trained again.

    Args:
        cell: the cell.
        num_gpus: GPUs for nnU-Net's DDP training (``-num_gpus`` when > 1; default 1).
        device: ``-device`` for training and calibration; None (default) passes none (the commands' own default).

    Returns:
        The shell line: exports of the nnU-Net path variables set in this shell, ``eval "$(nnunet-mbls
        env)"``, then train (``--c``) ``&&`` calibrate (``--if-missing``).
    """
    exports = [f"{k}={shlex.quote(os.environ[k])}" for k in NNUNET_PATH_VARIABLES if os.environ.get(k)]
    fold = FoldFolder.of(cell.dataset_id, cell.configuration, cell.fold, cell.trainer, cell.plans)
    dev = ("-device", device) if device else ()
    train = fold.train_command("--c", *dev, *(("-num_gpus", str(num_gpus)) if num_gpus > 1 else ()))
    calibrate = " ".join((fold.calibrate_command(), "--if-missing", *dev))
    prefix = f"export {' '.join(exports)}; " if exports else ""
    return f'{prefix}eval "$(nnunet-mbls env)"; ' + (calibrate if cell.is_trained() else f"{train} && {calibrate}")


def sbatch_script(jobs_file: Path, n_jobs: int, options: SlurmOptions) -> str:
    """A SLURM array script that runs line ``$SLURM_ARRAY_TASK_ID`` of ``jobs_file``.

    Args:
        jobs_file: the ``jobs.txt`` to read; logs go to ``logs/%A_%a.out`` beside it.
        n_jobs: the number of lines (the array is 1..n_jobs).
        options: GPUs, CPUs, memory, time and partition of each job.

    Returns:
        The script's text.
    """
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=nnunet-mbls",
        f"#SBATCH --array=1-{n_jobs}",
        f"#SBATCH --gres=gpu:{options.gpus}",
        f"#SBATCH --cpus-per-task={options.cpus}",
        f"#SBATCH --mem={options.mem}",
        f"#SBATCH --time={options.time}",
        f"#SBATCH --output={jobs_file.parent / 'logs'}/%A_%a.out",
    ]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    lines += [
        "set -euo pipefail",
        f'line="$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(jobs_file))})"',
        'echo "job ${SLURM_ARRAY_TASK_ID}: ${line}"',
        'eval "${line}"',
        "",
    ]
    return "\n".join(lines)


def emit_jobs(cells: list[Cell], out_dir: str | os.PathLike, num_gpus: int = 1,
              slurm: SlurmOptions | None = None, device: str | None = None) -> tuple[list[Cell], list[Cell]]:
    """Write jobs.txt (cells not finished), jobs_done.txt, jobs.sbatch, README.txt.

    ``jobs.sbatch`` is written only when something is left to do (a stale one is removed).

    Args:
        cells: the grid.
        out_dir: the folder to write into (created, with ``logs/``).
        num_gpus: GPUs per training job (default 1).
        slurm: SLURM options; None (default) uses :class:`SlurmOptions` with ``max(1, num_gpus)`` GPUs.
        device: ``-device`` of every command; None (default) passes none.

    Returns:
        ``(todo, done)``: the cells not calibrated yet and those that are.
    """
    out = Path(out_dir).resolve()
    todo = [c for c in cells if not c.is_calibrated()]
    done = [c for c in cells if c.is_calibrated()]
    jobs = out / "jobs.txt"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(jobs, "".join(job_command(c, num_gpus, device) + "\n" for c in todo))
    atomic_write_text(out / "jobs_done.txt", "".join(c.label() + "\n" for c in done))
    slurm = slurm or SlurmOptions(gpus=max(1, num_gpus))
    if todo:
        atomic_write_text(out / "jobs.sbatch", sbatch_script(jobs, len(todo), slurm))
    elif (out / "jobs.sbatch").exists():
        (out / "jobs.sbatch").unlink()
    atomic_write_text(out / "README.txt", f"""{len(todo)} jobs to run ({len(done)} cells already finished, see jobs_done.txt).
Each line of jobs.txt is one independent shell command (train one fold with nnUNetv2_train, then calibrate).

Run them with any queue, for example
  SLURM:          sbatch {out / 'jobs.sbatch'}
  one machine:    xargs -d '\\n' -P 2 -I CMD bash -c CMD < {jobs}
  GNU parallel:   parallel -j 2 < {jobs}
Then build the table from whatever has finished (missing cells are listed, never averaged over):
  nnunet-mbls benchmark <same -d/-c/-f/-tr arguments> --collect
Emit again after a partial run to get only the jobs that are still missing.
""")
    return todo, done
