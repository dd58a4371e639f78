"""benchmarks/gpu_check.py: its CPU dry run runs every part (or says why not) and its numbers hold together.

The script is meant for one run on a lent GPU machine; these tests run it as users would, in a subprocess
(``--dry-run``: the same code on the CPU at toy sizes, real nnU-Net planning, training, calibration and
prediction), and check the JSON and markdown it writes. Timings are checked for consistency (finite, positive,
ratios recomputed from the JSON), never against wall-clock limits.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_mbls.losses import LOSSES

from helpers.nnunet import REPO, NnUNet

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ANCHOR = "DC_and_CE"
NAMES = [ANCHOR, *LOSSES]
CASES = [(dim, classes, dtype) for dim in ("3d", "2d") for classes in (3, 8) for dtype in ("fp16", "bf16")]
TRAINER_CELLS = [(compile_, step) for compile_ in ("off", "on") for step in ("train_step", "validation_step")]


def strict_json(path: Path) -> dict:
    """The file as JSON, refusing NaN/Infinity (which the standard does not allow)."""
    def refuse(constant: str):
        raise AssertionError(f"{path} holds the non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def run_gpu_check(root: Path, *extra: str, env_extra: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run the script in a subprocess with nnU-Net's folders under ``root``; (JSON, markdown) it wrote."""
    nn = NnUNet(root / "nnunet")  # nnUNet_raw/preprocessed/results in tmp, compile off, one process, 2 threads
    out = root / "out"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--workdir", str(root / "work"), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(nn.env, **(env_extra or {})), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    data = strict_json(out / "gpu_check.json")
    markdown = (out / "gpu_check.md").read_text()
    assert data["argv"][1:] == cmd[2:], "the exact command line must be recorded"
    assert str(SCRIPT) in data["command"] and all(arg in data["command"] for arg in cmd[2:])
    return data, markdown


def skips(data: dict, part: str, **match) -> list[dict]:
    return [e for e in data["skipped"] if e["part"] == part and all(e.get(k) == v for k, v in match.items())]


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    return run_gpu_check(tmp_path_factory.mktemp("gpu_check_dry"), "--dry-run", env_extra={"CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.integration
def test_dry_run_records_machine_command_and_runs_without_errors(dry_run):
    data, _ = dry_run
    assert data["mode"] == "dry-run" and data["device"] == "cpu"
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cores"] >= 1
    assert "--dry-run" in data["command"]
    assert finite_positive(data["elapsed_s"]) and data["budget_s"] == 420
    assert data["targets"]["mbls"] == {"time": 1.0, "memory": 1.0}
    assert data["targets"]["other_losses"] == {"time": 1.5, "memory": 1.5}
    assert data["targets"]["trainer_step"] == {"time": 1.03}
    errors = [e for e in data["skipped"] if e["kind"] != "skipped"]
    assert not errors, f"parts raised in the dry run: {[(e['part'], e['reason'][:500]) for e in errors]}"
    for entry in data["skipped"]:
        assert entry["reason"].strip(), entry


@pytest.mark.integration
def test_every_loss_is_measured_or_skipped_with_a_reason_in_every_case(dry_run):
    data, _ = dry_run
    shapes = {"3d": "16 x 16 x 16", "2d": "32 x 32"}
    for dim, classes, dtype in CASES:
        case = {"dim": dim, "classes": classes, "dtype": dtype}
        rows = {r["loss"]: r for r in data["losses"] if all(r[k] == v for k, v in case.items())}
        skipped = {name for e in skips(data, "losses", **case) for name in e["losses"]}
        for name in NAMES:
            assert (name in rows) != (name in skipped), f"{name} in {case}: measured {name in rows}, skipped {name in skipped}"
        for row in rows.values():
            assert row["shape"] == f"(2, {classes}, {shapes[dim]})"
        if dtype == "bf16":  # torch's CPU autocast has had bf16 since 1.10: the dry run must measure it
            assert set(rows) == set(NAMES), f"bf16 {case} not measured: {skips(data, 'losses', **case)}"
        elif skipped:
            assert all("fp16" in e["reason"] for e in skips(data, "losses", **case))
    assert len(data["losses"]) >= len(NAMES) * 4  # every bf16 case


@pytest.mark.integration
def test_loss_times_memory_and_ratios_hold_together(dry_run):
    data, _ = dry_run
    repeats = data["settings"]["repeats"]
    anchors = {(r["dim"], r["classes"], r["dtype"]): r for r in data["losses"] if r["loss"] == ANCHOR}
    for row in data["losses"]:
        where = f"{row['loss']} {row['dim']} C={row['classes']} {row['dtype']}"
        assert finite_positive(row["time_s"]) and finite_positive(row["memory_bytes"]), where
        assert len(row["times_s"]) == repeats and all(finite_positive(t) for t in row["times_s"]), where
        assert row["time_s"] == pytest.approx(statistics.median(row["times_s"]), rel=1e-12), where
        assert len(row["warmup_s"]) == data["settings"]["warmup"] >= 1, where  # warm-up ran, and is not in times_s
        anchor = anchors[(row["dim"], row["classes"], row["dtype"])]
        assert row["time_ratio"] == pytest.approx(row["time_s"] / anchor["time_s"], rel=1e-9), where
        assert row["memory_ratio"] == pytest.approx(row["memory_bytes"] / anchor["memory_bytes"], rel=1e-9), where
        expected_target = None if row["loss"] == ANCHOR else 1.0 if row["loss"] == "mbls" else 1.5
        assert row["target_ratio"] == expected_target, where
        if expected_target is not None:
            assert row["meets_time_target"] == (row["time_ratio"] <= expected_target), where
            assert row["meets_memory_target"] == (row["memory_ratio"] <= expected_target), where
    # memory is a deterministic count of tensor bytes: 8 classes need more than 3 for the same loss and shape
    by_key = {(r["loss"], r["dim"], r["dtype"], r["classes"]): r["memory_bytes"] for r in data["losses"]}
    for (loss, dim, dtype, classes), nbytes in by_key.items():
        if classes == 3 and (loss, dim, dtype, 8) in by_key:
            assert by_key[(loss, dim, dtype, 8)] > nbytes, (loss, dim, dtype)


@pytest.mark.integration
def test_markdown_has_a_row_per_loss_with_numbers_and_targets(dry_run):
    data, markdown = dry_run
    lines = markdown.splitlines()
    assert any(line.startswith("Targets: MbLS <= 1.0x") for line in lines)
    assert data["command"] in markdown
    for name in NAMES:
        measured = sum(1 for r in data["losses"] if r["loss"] == name)
        rows = [line for line in lines if re.match(rf"\| {re.escape(name)} \| [0-9]", line)]
        assert len(rows) == measured >= 4, f"{name}: {len(rows)} markdown rows for {measured} measured cases"
    mbls_row = next(line for line in lines if line.startswith("| mbls |"))
    assert "<= 1.0x" in mbls_row and re.search(r"\| (yes|NO), (yes|NO) \|$", mbls_row)


@pytest.mark.integration
def test_trainer_steps_have_numbers_or_a_skip_reason(dry_run):
    data, markdown = dry_run
    trainers = ("nnUNetTrainer", "nnUNetTrainerMbLS")
    for compile_, step in TRAINER_CELLS:
        rows = {r["trainer"]: r for r in data["trainer_steps"] if r["compile"] == compile_ and r["step"] == step}
        skipped = skips(data, "trainer_steps", compile=compile_, step=step)
        assert bool(rows) != bool(skipped), (compile_, step, rows, skipped)
        if skipped:
            assert all(e["reason"].strip() for e in skipped)
            continue
        assert set(rows) == set(trainers)
        stock = rows["nnUNetTrainer"]
        for name, row in rows.items():
            assert finite_positive(row["time_s"]) and finite_positive(row["memory_bytes"]), (compile_, step, name)
            assert len(row["times_s"]) == data["settings"]["trainer_iterations"]
            assert row["time_s"] == pytest.approx(statistics.median(row["times_s"]), rel=1e-12)
            assert row["time_ratio"] == pytest.approx(row["time_s"] / stock["time_s"], rel=1e-9)
            assert row["memory_ratio"] == pytest.approx(row["memory_bytes"] / stock["memory_bytes"], rel=1e-9)
            assert row["compiled"] == (compile_ == "on")
            assert re.search(rf"^\| {step} \| {compile_} \| {name} \| ", markdown, re.M), (step, compile_, name)
        assert rows["nnUNetTrainerMbLS"]["target_ratio"] == 1.03
        assert rows["nnUNetTrainerMbLS"]["meets_time_target"] == (rows["nnUNetTrainerMbLS"]["time_ratio"] <= 1.03)
    # the CPU dry run times the uncompiled steps; nnU-Net refuses torch.compile on the CPU, which must be said
    assert {(r["compile"], r["step"]) for r in data["trainer_steps"]} >= {("off", "train_step"), ("off", "validation_step")}
    for step in ("train_step", "validation_step"):
        (entry,) = skips(data, "trainer_steps", compile="on", step=step)
        assert "_do_i_compile" in entry["reason"] and "cpu" in entry["reason"]
    batch = data["trainer_steps"][0]["batch_shape"]
    assert len(batch) == 5 and batch[1] == 1  # (B, channels, z, y, x): the 3d_fullres configuration


@pytest.mark.integration
def test_calibration_step_and_calibrated_prediction_are_timed(dry_run):
    data, markdown = dry_run
    for item in ("calibrate", "predict"):
        rows = [r for r in data["pipeline"] if r["item"] == item]
        skipped = skips(data, "pipeline", item=item)
        assert len(rows) + len(skipped) == 1, (item, rows, skipped)
        assert skipped == [], f"{item} did not run in the dry run: {skipped}"
        (row,) = rows
        assert finite_positive(row["wall_s"]) and row["num_cases"] >= 1
        assert re.search(rf"^\| {item} \| .* \| [0-9.]+ \| ", markdown, re.M), item
    calibrate = next(r for r in data["pipeline"] if r["item"] == "calibrate")
    assert finite_positive(calibrate["temperature"]) and calibrate["wrote"] == "checkpoint_final_calibrated.pth"
    predict = next(r for r in data["pipeline"] if r["item"] == "predict")
    assert "nnUNetv2_predict" in predict["command"] and "-chk checkpoint_final_calibrated.pth" in predict["command"]
    assert "-device cpu" in predict["command"]


def test_time_budget_skips_every_part_and_says_so(tmp_path):
    data, markdown = run_gpu_check(tmp_path, "--dry-run", "--budget-s", "0")
    assert data["losses"] == [] and data["trainer_steps"] == [] and data["pipeline"] == []
    for dim, classes, dtype in CASES:
        (entry,) = skips(data, "losses", dim=dim, classes=classes, dtype=dtype)
        assert set(entry["losses"]) == set(NAMES)
        assert entry["reason"].startswith("time budget") or "fp16" in entry["reason"]
    for compile_ in ("off", "on"):
        assert [e["reason"] for e in skips(data, "trainer_steps", compile=compile_)]
        assert all(e["reason"].startswith("time budget") for e in skips(data, "trainer_steps", compile=compile_))
    assert skips(data, "pipeline") and all(e["reason"].startswith("time budget") for e in skips(data, "pipeline"))
    assert "## Not run, and why" in markdown and "time budget" in markdown


def test_without_cuda_the_gpu_run_says_so_instead_of_crashing(tmp_path):
    data, markdown = run_gpu_check(tmp_path, env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert data["mode"] == "cuda" and data["device"] == "cpu"
    assert data["losses"] == [] and data["trainer_steps"] == [] and data["pipeline"] == []
    parts = {e["part"] for e in data["skipped"] if e["reason"].startswith("cuda not available")}
    assert parts == {"losses", "trainer_steps", "pipeline"}
    assert "cuda not available" in markdown
