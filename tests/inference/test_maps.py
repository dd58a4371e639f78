"""Nothing lost, nothing inconsistent (issue 17): one test per failure found by attacking the commands.

Each test feeds the command the input of the report and asserts one error line naming the file and the fix,
the inputs byte-identical, and the output as it was before the command started; the concurrency and SIGKILL
tests run the real console script in subprocesses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from eval_folders import make_fold, write_eval_folders, write_probs, write_seg

BIN = Path(sys.executable).parent
SHAPE = (4, 6, 5)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0))
    return (e / e.sum(0)).astype(np.float32)


def _cases(n: int, seed: int = 0, shape=SHAPE) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = rng.integers(0, 3, shape)
        logits = rng.normal(size=(3,) + shape) + 2.5 * np.eye(3)[labels].transpose(3, 0, 1, 2)
        out.append((labels, _softmax(logits)))
    return out


def _digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script: in a subprocess with ``env`` (nnU-Net reads its folders at import), else in this process."""
    if env is not None:
        return subprocess.run([str(BIN / "nnunet-mbls"), *args], capture_output=True, text=True,
                              env=dict(os.environ, **env))
    from nnunet_mbls.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"nnunet-mbls {command}: error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------ 1. evaluate -o onto its own inputs
@pytest.mark.parametrize("target", ["pred/case_0.npz", "pred/case_1.pkl", "ref/case_0.nii.gz", "dataset.json",
                                    "pred/case_0.json", "ref/new.json", "pred"])
def test_evaluate_refuses_an_output_over_its_inputs_and_changes_nothing(tmp_path, target):
    ref, pred = write_eval_folders(tmp_path, _cases(2), 3)
    with open(pred / "case_1.pkl", "wb") as f:
        pickle.dump({"spacing": [1.0, 1.0, 1.0]}, f)
    before = _digest(tmp_path)
    proc = _cli("evaluate", "-ref", str(ref), "-pred", str(pred), "-djfile", str(tmp_path / "dataset.json"),
                "-o", str(tmp_path / target))
    line = _one_error_line(proc, "evaluate")
    assert str(tmp_path / target) in line and ("input" in line) and "write the output" in line, line
    assert _digest(tmp_path) == before


def test_evaluate_output_through_a_symlink_onto_an_input_is_refused(tmp_path):
    from nnunet_mbls.io import refuse_outputs_over_inputs

    ref, pred = write_eval_folders(tmp_path, _cases(1), 3)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "metrics.json"
    link.symlink_to(pred / "case_0.npz")
    with pytest.raises(ValueError, match="is the input"):
        refuse_outputs_over_inputs({"-o": link}, {"-pred files": list(pred.glob("*.npz"))})
    # the default output (inside -pred, a name of ours) stays allowed, and so does a rerun over it
    for _ in range(2):
        proc = _cli("evaluate", "-ref", str(ref), "-pred", str(pred))
        assert proc.returncode == 0, proc.stderr
    assert (pred / "calibration_metrics_fg.json").is_file() and (pred / "calibration_metrics_fg.png").is_file()


# ------------------------------------------------------------------ 2. "is calibrated" read from the files
@pytest.fixture
def calibrated_fold(tmp_path, monkeypatch):
    """A hand-made trained fold calibrated by the real step: (fold folder, env for the console script)."""
    from nnunet_mbls.calibration.folds import calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    cases = {f"case_{i}": c for i, c in enumerate(_cases(4, seed=1, shape=(6, 8, 7)))}
    fold = make_fold(tmp_path, cases, list(cases))
    calibrate_output_folder(fold, progress=False, log=lambda *a: None)
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1"}
    (tmp_path / "raw").mkdir()
    return fold, env


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKS = {
    "calibrated checkpoint deleted": lambda f: (f / "checkpoint_final_calibrated.pth").unlink(),
    "calibrated checkpoint truncated": lambda f: _truncate(f / "checkpoint_final_calibrated.pth"),
    "calibrated checkpoint not a torch file": lambda f: (f / "checkpoint_final_calibrated.pth").write_text("hello"),
    "calibration.json cut in half": lambda f: _truncate(f / "calibration.json"),
    "calibration.json holds another T": lambda f: (f / "calibration.json").write_text(json.dumps(
        dict(json.loads((f / "calibration.json").read_text()), checkpoint_temperature=0.5248))),
    "checkpoint_final.pth retrained": lambda f: torch.save(
        {"network_weights": {"decoder.seg_layers.0.weight": torch.ones(3, 8, 1, 1, 1),
                             "decoder.seg_layers.0.bias": torch.zeros(3)}}, f / "checkpoint_final.pth"),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_is_calibrated_reads_the_files_not_their_times(calibrated_fold, kind):
    from nnunet_mbls.calibration.folds import calibration_problem

    fold, _ = calibrated_fold
    assert calibration_problem(fold) is None
    BREAKS[kind](fold)
    os.utime(fold / "checkpoint_final.pth", (0, 0))  # the old rule (mtimes) would call every one of these current
    assert calibration_problem(fold) is not None


@pytest.mark.parametrize("kind", ["calibrated checkpoint truncated", "calibration.json cut in half"])
def test_calibrate_if_missing_redoes_a_broken_calibration(calibrated_fold, kind):
    from nnunet_mbls.calibration.folds import calibration_problem

    fold, env = calibrated_fold
    args = ("calibrate", "-d", "777", "-c", "3d_fullres", "-f", "0", "-tr", "Tr", "--if-missing", "-device", "cpu")
    first = _cli(*args, env=env)
    assert first.returncode == 0 and "up to date" in first.stdout, first.stdout + first.stderr
    BREAKS[kind](fold)
    second = _cli(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert "calibrating (--if-missing)" in second.stdout and "up to date" not in second.stdout
    assert calibration_problem(fold) is None


# ------------------------------------------------------------------ 3. two calibrations of one fold at once
def test_simultaneous_calibrations_record_the_temperature_they_fold(calibrated_fold):
    """Four runs with different subsamples (so different T) at once: whatever the interleaving, the record, the
    checkpoint and the after-evaluation agree, because the fold is locked."""
    fold, env = calibrated_fold
    procs = [subprocess.Popen([str(BIN / "nnunet-mbls"), "calibrate", "-d", "777", "-c", "3d_fullres", "-f", "0",
                               "-tr", "Tr", "--max-voxels", "40", "--seed", str(seed), "-device", "cpu"],
                              env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    fitted = {float(out.strip().splitlines()[-1].split("T = ")[1]) for out, _ in outputs}  # the command's last line
    assert len(fitted) > 1  # the runs disagree, so an interleaving would show
    record = json.loads((fold / "calibration.json").read_text())
    folded = torch.load(fold / "checkpoint_final_calibrated.pth", weights_only=False)["mbls_temperature"]
    after = json.loads((fold / "calibration" / "evaluation_after.json").read_text())["temperature"]
    assert record["temperature"] == record["checkpoint_temperature"] == pytest.approx(folded, rel=1e-12)
    assert after == record["temperature"]
    assert not (fold / ".nnunet_mbls.lock").exists()


def test_fold_lock_is_released_when_its_owner_is_killed(tmp_path):
    from nnunet_mbls.locks import LOCK_NAME, FoldLockTimeout, fold_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from nnunet_mbls.locks import fold_lock\n"
        f"with fold_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FoldLockTimeout, match=f"pid {holder.pid}"):
        with fold_lock(tmp_path, timeout_s=0.5):
            pass
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the stale file is still there ...
    with fold_lock(tmp_path, timeout_s=5):  # ... and does not block
        pass
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------ 4. apply-temperature on bad input
def _apply_folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i, (_, probs) in enumerate(_cases(3)):
        write_probs(src / f"case_{i}.npz", probs)
        with open(src / f"case_{i}.pkl", "wb") as f:
            pickle.dump({"spacing": [1.0, 1.0, 1.0]}, f)
    return src


APPLY_BREAKS = {
    "truncated npz": (lambda src: _truncate(src / "case_1.npz"), ["case_1", "case_1.npz", "cannot read"]),
    "wrong key": (lambda src: np.savez(src / "case_1.npz", logits=np.zeros((3,) + SHAPE)), ["no 'probabilities'"]),
    "not summing to 1": (lambda src: write_probs(src / "case_1.npz", np.full((3,) + SHAPE, 0.5, np.float32)),
                         ["case_1", "do not sum to 1"]),
}


@pytest.mark.parametrize("kind", list(APPLY_BREAKS))
def test_apply_temperature_bad_npz_writes_nothing_and_the_rerun_after_repair_works(tmp_path, kind):
    src = _apply_folder(tmp_path)
    good = (src / "case_1.npz").read_bytes()
    breaks, fragments = APPLY_BREAKS[kind]
    breaks(src)
    out = tmp_path / "out"
    line = _one_error_line(_cli("apply-temperature", "-i", str(src), "-o", str(out), "-t", "1.5"), "apply-temperature")
    assert all(f in line for f in fragments), line
    assert not out.exists()
    (src / "case_1.npz").write_bytes(good)
    assert _cli("apply-temperature", "-i", str(src), "-o", str(out), "-t", "1.5").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    with np.load(out / "case_1.npz") as data, np.load(src / "case_1.npz") as raw:
        p = raw["probabilities"].astype(np.float64) ** (1 / 1.5)
        np.testing.assert_allclose(data["probabilities"], p / p.sum(0), rtol=1e-5)


@pytest.mark.parametrize("content, fragment", [("{}", "holds no 'temperature'"), ("{not json", "cannot be read as JSON"),
                                               ('{"temperature": "1.5"}', "temperature '1.5' is invalid"),
                                               ('{"temperature": -2}', "temperature -2 is invalid")])
def test_apply_temperature_bad_calibration_json_names_the_file(tmp_path, content, fragment):
    src = _apply_folder(tmp_path)
    record = tmp_path / "calibration.json"
    record.write_text(content)
    line = _one_error_line(_cli("apply-temperature", "-i", str(src), "-o", str(tmp_path / "out"),
                                "--calibration-json", str(record)), "apply-temperature")
    assert fragment in line and str(record) in line, line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 5. maps on bad probabilities
def _maps_folder(tmp_path: Path, n: int = 3, shape=SHAPE) -> Path:
    """A hand-made nnUNetv2_predict --save_probabilities folder: .npz, .pkl, segmentation, dataset.json."""
    src = tmp_path / "pred"
    src.mkdir()
    for i, (_, probs) in enumerate(_cases(n, shape=shape)):
        write_probs(src / f"case_{i:03d}.npz", probs)
        write_seg(src / f"case_{i:03d}.nii.gz", probs.argmax(0))
        with open(src / f"case_{i:03d}.pkl", "wb") as f:
            pickle.dump({"spacing": [2.0, 1.5, 1.0]}, f)
    (src / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                 "channel_names": {"0": "x"}, "file_ending": ".nii.gz"}))
    return src


def _bad(p: np.ndarray, kind: str) -> np.ndarray:
    p = p.copy()
    if kind == "NaN":
        p[1, 0, 0, 0] = np.nan
    elif kind == "negative":
        p[1, 0, 0, 0] = -0.2
    elif kind == "unnormalised":
        p *= 1.5
    elif kind == "channels":
        p = np.concatenate([p, p[:1] * 0], 0)
    elif kind == "shape":
        p = p[:, :-1]
    return p


@pytest.mark.parametrize("kind, fragment", [("NaN", "NaN"), ("negative", "outside [0, 1]"),
                                            ("unnormalised", "outside [0, 1]"), ("channels", "4 channels"),
                                            ("shape", "spatial shape (3, 6, 5)")])
def test_maps_bad_probabilities_leave_the_output_as_it_was(tmp_path, kind, fragment):
    src = _maps_folder(tmp_path)
    out = tmp_path / "out"
    assert _cli("maps", "-i", str(src), "-o", str(out)).returncode == 0
    before = _digest(out)
    with np.load(src / "case_002.npz") as data:
        write_probs(src / "case_002.npz", _bad(data["probabilities"], kind))  # the last case: the others were fine
    line = _one_error_line(_cli("maps", "-i", str(src), "-o", str(out), "-t", "2"), "maps")
    assert "case_002" in line and fragment in line, line
    assert _digest(out) == before


def test_maps_bad_case_into_a_new_folder_creates_nothing(tmp_path):
    src = _maps_folder(tmp_path)
    with np.load(src / "case_001.npz") as data:
        write_probs(src / "case_001.npz", _bad(data["probabilities"], "NaN"))
    _one_error_line(_cli("maps", "-i", str(src), "-o", str(tmp_path / "new")), "maps")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ 6. SIGKILL while writing
def test_sigkill_during_maps_then_rerun_leaves_only_complete_case_files(tmp_path):
    src = _maps_folder(tmp_path, n=24, shape=(12, 16, 14))
    out = tmp_path / "out"
    maps = out / "maps"
    maps.mkdir(parents=True)
    (maps / ".c067.nii.gz.hr9opd6i.nii.gz").write_bytes(b"")  # a 0.2 leftover, as reported
    proc = subprocess.Popen([str(BIN / "nnunet-mbls"), "maps", "-i", str(src), "-o", str(out), "--maps",
                             "probabilities", "confidence", "entropy"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".nnunet_mbls-partial.") for p in out.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # a random point of the case loop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in maps.glob("case_*"):  # killed while moving staged files into place: each one is complete
        sitk.ReadImage(str(path))
    rerun = _cli("maps", "-i", str(src), "-o", str(out), "--maps", "probabilities", "confidence", "entropy")
    assert rerun.returncode == 0, rerun.stderr
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    cases = [f"case_{i:03d}" for i in range(24)]
    expected = sorted(["maps", "qc.csv", "qc.json"] + [f"maps/{c}_{s}.nii.gz" for c in cases
                                                       for s in ("prob_a", "prob_b", "confidence", "entropy")])
    assert names == expected
    for path in maps.iterdir():
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == (14, 16, 12)
    assert len(json.loads((out / "qc.json").read_text())["cases"]) == 24


def test_a_killed_atomic_write_leaves_no_file_a_glob_matches_and_the_next_write_cleans_it(tmp_path):
    script = (
        "import sys, time\nfrom nnunet_mbls.io import atomic_write\n"
        "def write(tmp):\n    open(tmp, 'wb').write(b'half'); print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(tmp_path / 'c067.nii.gz')!r}, write)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    (tmp_path / ".checkpoint_final_calibrated.pth.k2j4h6g8.tmp").write_bytes(b"")  # a 0.2 leftover
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 2 and not list(tmp_path.glob("*.nii.gz")) and not list(tmp_path.glob("*.pth"))
    from nnunet_mbls.io import atomic_write_text

    subprocess.run([sys.executable, "-c", f"from nnunet_mbls.io import atomic_write_text; "
                                          f"atomic_write_text({str(tmp_path / 'x.txt')!r}, 'ok')"], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    atomic_write_text(tmp_path / "y.txt", "ok")  # a live process's partial folder is never taken for stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt", "y.txt"]


# ------------------------------------------------------------------ 7. predict --calibrated, corrupt checkpoint
def test_predict_calibrated_with_a_corrupt_calibrated_checkpoint_names_it(calibrated_fold, tmp_path):
    fold, env = calibrated_fold
    _truncate(fold / "checkpoint_final_calibrated.pth")
    images = tmp_path / "images"
    images.mkdir()
    write_seg(images / "case_0000.nii.gz", np.zeros(SHAPE))
    out = tmp_path / "predictions"
    line = _one_error_line(_cli("predict", "-i", str(images), "-o", str(out), "-d", "777", "-c", "3d_fullres", "-f",
                                "0", "-tr", "Tr", "--calibrated", "-device", "cpu", "-npp", "0", env=env), "predict")
    assert "checkpoint_final_calibrated.pth" in line and "nnunet-mbls calibrate -d" in line, line
    assert not out.exists()


# ------------------------------------------------------------------ 9. predict: channels the model does not take
@pytest.mark.integration
def test_predict_with_two_channels_for_a_one_channel_model_names_the_case(trained_stock_3d, tmp_path):
    nn, dataset, fold = trained_stock_3d
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((nn.raw / dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    for channel in ("0000", "0001"):
        (images / f"extra_{channel}.nii.gz").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "nnunet-mbls"), "predict", "-i", str(images), "-o", str(out), "-d", "501", "-c",
                           "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test", "-device", "cpu", "-npp", "0"],
                          env=nn.env, capture_output=True, text=True)
    line = _one_error_line(proc, "predict")
    assert "case extra has 2 channel file(s)" in line and "expects 1" in line and "extra_0000.nii.gz" in line, line
    assert not out.exists()


# ------------------------------------------------------------------ 10. a symlink loop among the predictions
def test_a_symlink_loop_among_the_predictions_is_named_as_such(tmp_path):
    ref, pred = write_eval_folders(tmp_path, _cases(2), 3)
    (pred / "loop.npz").symlink_to(pred / "loop.npz")
    line = _one_error_line(_cli("evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "m.json")),
                           "evaluate")
    assert "loop.npz" in line and "loops or points nowhere" in line and "no reference" not in line, line
    assert not (tmp_path / "m.json").exists()
