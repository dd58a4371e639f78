"""nnunet_mbls.benchmark.jobs: the benchmark grid emitted as cluster jobs, run locally with xargs, then collected
(real nnU-Net training, CPU)."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.integration  # every test trains/plans with nnU-Net or runs the demo


TRAINERS = ["nnUNetTrainerStock_test", "nnUNetTrainerMbLS_test"]


def test_emit_jobs_run_with_xargs_then_collect(trained_stock_3d, tmp_path):
    nn, dataset, _ = trained_stock_3d
    grid = ["-d", "501", "-c", "3d_fullres", "-f", "0", "3", "-tr", *TRAINERS, "--baseline", "nnUNetTrainerStock_test"]
    jobs = tmp_path / "jobs"
    nn.run("nnunet-mbls", "benchmark", *grid, "--emit-jobs", str(jobs), "--device-for-jobs", "cpu")
    finished = {(t, f) for t in TRAINERS for f in ("0", "3") if (nn.fold_folder(dataset, t, "3d_fullres", int(f)) / "calibration.json").is_file()}
    lines = (jobs / "jobs.txt").read_text().splitlines()
    assert len(lines) == 4 - len(finished) >= 2  # fold 3 of both trainers at least
    assert all(f"-tr {t} " in l for l in lines for t in [l.split("-tr ")[1].split()[0]])
    sbatch = (jobs / "jobs.sbatch").read_text()
    assert f"#SBATCH --array=1-{len(lines)}" in sbatch
    assert subprocess.run(["bash", "-n", str(jobs / "jobs.sbatch")]).returncode == 0

    # before running anything: collect names the missing cells instead of averaging over fewer folds
    proc = nn.run("nnunet-mbls", "benchmark", *grid, "--collect", "-o", str(tmp_path / "bench"))
    results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
    assert any("fold 3 nnUNetTrainerMbLS_test" in m for m in results["missing_cells"])
    assert "Missing cells" in proc.stdout

    # run the jobs locally, two at a time, as a user without a cluster would
    env = dict(nn.env, nnUNet_n_proc_DA="0")
    run = subprocess.run(["bash", "-c", f"xargs -d '\\n' -P 2 -I CMD bash -c CMD < {jobs / 'jobs.txt'}"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    nn.run("nnunet-mbls", "benchmark", *grid, "--emit-jobs", str(jobs))
    assert (jobs / "jobs.txt").read_text() == ""
    assert len((jobs / "jobs_done.txt").read_text().splitlines()) == 4
    nn.run("nnunet-mbls", "benchmark", *grid, "--collect", "-o", str(tmp_path / "bench"))
    results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
    assert results["missing_cells"] == []
    for trainer in TRAINERS:
        assert sorted(results["rows"][trainer]["folds_done"]) == ["0", "3"]
    splits = json.loads((nn.preprocessed / dataset / "splits_final.json").read_text())
    for trainer in TRAINERS:
        assert results["rows"][trainer]["num_cases"] == len(splits[0]["val"]) + len(splits[3]["val"])

    # two folds: one temperature shared by them (pooled out-of-fold fit), and with --vector-scaling its vector rows;
    # measured only: the folds' calibration files and checkpoints are not touched
    stamps = {t: (nn.fold_folder(dataset, t, "3d_fullres") / "checkpoint_final_calibrated.pth").stat().st_mtime_ns
              for t in TRAINERS}
    nn.run("nnunet-mbls", "benchmark", *grid, "--collect", "--vector-scaling", "-device", "cpu", "-o", str(tmp_path / "bench"))
    results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
    md = (tmp_path / "bench" / dataset / "results.md").read_text()
    for trainer in TRAINERS:
        row = results["rows"][trainer]
        assert row["stages"] == ["before", "after", "shared", "vector"] and 0.05 <= row["shared_temperature"] <= 20
        assert row["ece_shared"]["n"] == row["num_cases"] and row["ece_vector"]["n"] == row["num_cases"]
        assert row["vector_scaling"]["method"]["requested"] == "vector" and len(row["vector_scaling"]["vector_scaling"]["scale"]) == 4
        assert (nn.fold_folder(dataset, trainer, "3d_fullres") / "checkpoint_final_calibrated.pth").stat().st_mtime_ns == stamps[trainer]
    assert "After one temperature shared by the folds" in md and "After vector scaling" in md
