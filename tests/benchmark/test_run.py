"""nnunet_mbls.benchmark.run: ``nnunet-mbls benchmark`` trains, calibrates, tabulates and resumes, and redoes a
failed calibration step without retraining, on tiny real nnU-Net runs (CPU)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import wilcoxon

pytestmark = pytest.mark.integration  # every test trains/plans with nnU-Net or runs the demo


TRAINERS = ["nnUNetTrainerStock_test", "nnUNetTrainerMbLS_test"]


def mean_case_metric(evaluation: dict, metric: str) -> dict[str, float]:
    out = {}
    for case, m in evaluation["per_case"].items():
        out[case] = float(np.nanmean(list(m[metric].values()))) if isinstance(m[metric], dict) else m[metric]
    return out


def test_benchmark_trains_calibrates_tabulates_and_resumes(trained_stock_3d, tmp_path):
    nn, dataset, stock_fold = trained_stock_3d
    out = tmp_path / "bench"
    args = ["nnunet-mbls", "benchmark", "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", *TRAINERS,
            "--baseline", "nnUNetTrainerStock_test", "-device", "cpu", "-o", str(out)]
    nn.run(*args, "--train", training=True)
    folder = out / dataset
    results = json.loads((folder / "results.json").read_text())
    assert results["missing_cells"] == []
    # every number of the table is recomputed here from the calibration step's per-case files
    per_trainer = {}
    for trainer in TRAINERS:
        fold = nn.fold_folder(dataset, trainer, "3d_fullres")
        per_trainer[trainer] = json.loads((fold / "calibration" / "evaluation_before.json").read_text())
        row = results["rows"][trainer]
        for metric in ("ece", "nll", "dice"):
            values = list(mean_case_metric(per_trainer[trainer], metric).values())
            assert row[f"{metric}_before"]["mean"] == pytest.approx(np.nanmean(values), rel=1e-9)
            assert row[f"{metric}_before"]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
        after = json.loads((fold / "calibration" / "evaluation_after.json").read_text())
        assert row["ece_after"]["mean"] == pytest.approx(after["mean"]["ece"], rel=1e-9)
    a = mean_case_metric(per_trainer["nnUNetTrainerMbLS_test"], "ece")
    b = mean_case_metric(per_trainer["nnUNetTrainerStock_test"], "ece")
    diff = [a[c] - b[c] for c in sorted(a)]
    paired = results["rows"]["nnUNetTrainerMbLS_test"]["ece_before_vs_baseline"]
    assert paired["mean"] == pytest.approx(np.mean(diff)) and paired["n"] == len(diff)
    assert paired["wins"] == sum(d < 0 for d in diff)
    assert paired["p"] == pytest.approx(wilcoxon(diff).pvalue)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert len([r for r in rows if r["stage"] != "failure_detection"]) == 2 * 2 * 9  # trainers x stages x metrics
    assert len([r for r in rows if r["stage"] == "failure_detection"]) == 2 * 4 * 4  # trainers x scores x statistics
    # cases.csv: one row per (trainer, fold, case); its scores are those of nnunet-mbls maps' QC on the same files
    cases = list(csv.DictReader(open(folder / "cases.csv")))
    splits = json.loads((nn.preprocessed / dataset / "splits_final.json").read_text())
    assert sorted((r["trainer"], r["case"]) for r in cases) == sorted((t, c) for t in TRAINERS for c in splits[0]["val"])
    fold = nn.fold_folder(dataset, "nnUNetTrainerMbLS_test", "3d_fullres")
    # the benchmark trained without probability files (streamed statistics); nnU-Net's own --val --npz of the same
    # checkpoint gives the .npz that `nnunet-mbls maps` scores independently
    assert not list((fold / "validation").glob("*.npz"))
    nn.run("nnUNetv2_train", "501", "3d_fullres", "0", "-tr", "nnUNetTrainerMbLS_test", "--val", "--npz", "-device", "cpu",
           training=True)
    qc_input = tmp_path / "qc_input"
    qc_input.mkdir()
    for f in list((fold / "validation").glob("case_*")) + [fold.parent / "dataset.json", fold.parent / "plans.json"]:
        (qc_input / f.name).symlink_to(f)
    nn.run("nnunet-mbls", "maps", "-i", str(qc_input), "-o", str(tmp_path / "qc"))
    for f in [*(fold / "validation").glob("*.npz"), *(fold / "validation").glob("*.pkl")]:
        f.unlink()  # the fold as the benchmark left it, for the other tests of the session
    qc = {r["case"]: r for r in csv.DictReader(open(tmp_path / "qc" / "qc.csv"))}
    for row in (r for r in cases if r["trainer"] == "nnUNetTrainerMbLS_test"):
        for score in ("mean_entropy_fg", "mean_entropy_boundary"):
            assert float(row[f"{score}_before"]) == pytest.approx(float(qc[row["case"]][score]), rel=1e-6)
        assert float(row["dice"]) == pytest.approx(mean_case_metric(per_trainer["nnUNetTrainerMbLS_test"], "dice")[row["case"]])
    detection = results["failure_detection"]
    assert detection["nnUNetTrainerMbLS_test"]["n_cases"] == len(splits[0]["val"])
    assert (folder / "risk_coverage.png").stat().st_size > 1000
    md = (folder / "results.md").read_text()
    assert "| nnUNetTrainerMbLS_test |" in md and "Paired difference to nnUNetTrainerStock_test" in md
    assert (folder / "reliability.png").stat().st_size > 1000 and (folder / "ece_vs_dice.png").stat().st_size > 1000

    # resuming: finished cells are skipped, nothing is retrained or recalibrated
    checkpoints = {t: nn.fold_folder(dataset, t, "3d_fullres") / "checkpoint_final.pth" for t in TRAINERS}
    stamps = {t: (p.stat().st_mtime_ns, (p.parent / "calibration.json").stat().st_mtime_ns) for t, p in checkpoints.items()}
    proc = nn.run(*args, "--train", training=True)
    assert proc.stdout.count("done already") == 2
    assert {t: (p.stat().st_mtime_ns, (p.parent / "calibration.json").stat().st_mtime_ns) for t, p in checkpoints.items()} == stamps


def test_a_failed_calibration_step_keeps_the_training_and_is_redone_without_retraining(nnunet_3d, tmp_path):
    nn, dataset = nnunet_3d
    trainer = "nnUNetTrainerMbLS_badcalib_test"
    proc = nn.train(501, "3d_fullres", trainer, "0", check=False)
    assert proc.returncode == 1  # the scheduler sees the failure
    fold = nn.fold_folder(dataset, trainer, "3d_fullres")
    redo = f"nnunet-mbls calibrate -d {dataset} -c 3d_fullres -f 0 -tr {trainer} -p nnUNetPlans"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert redo in proc.stderr and redo in log and "max_voxels must be an integer >= 1" in log
    splits = json.loads((nn.preprocessed / dataset / "splits_final.json").read_text())
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    # the statistics streamed out of the validation stay for the redo; no probability file was written
    assert {p.name[:-4] for p in (fold / "validation_statistics").glob("*.npz")} == set(splits[0]["val"])
    assert not list((fold / "validation").glob("*.npz"))
    assert not (fold / "calibration.json").exists()

    grid = ["-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", trainer, "--baseline", trainer]
    nn.run("nnunet-mbls", "benchmark", *grid, "--collect", "-o", str(tmp_path / "bench"))
    results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
    assert len(results["missing_cells"]) == 1 and redo in results["missing_cells"][0]
    nn.run("nnunet-mbls", "benchmark", *grid, "--emit-jobs", str(tmp_path / "jobs"))
    (job,) = (tmp_path / "jobs" / "jobs.txt").read_text().splitlines()
    assert "nnUNetv2_train" not in job and f"nnunet-mbls calibrate -d 501 -c 3d_fullres -f 0 -tr {trainer}" in job

    stamp = (fold / "checkpoint_final.pth").stat().st_mtime_ns
    nn.run("nnunet-mbls", "benchmark", *grid, "--train", "-device", "cpu", "-o", str(tmp_path / "bench"), training=True)
    assert (fold / "checkpoint_final.pth").stat().st_mtime_ns == stamp  # not trained again
    assert json.loads((fold / "calibration.json").read_text())["fit"]["subsample_size"] > 0
    results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
    assert results["missing_cells"] == [] and results["rows"][trainer]["num_cases"] == len(splits[0]["val"])
