"""nnunet_mbls.calibration.evaluation.inputs: bad ``evaluate`` folders give one error line naming the case and the
problem and nothing is written (robustness, issue 6); a symlink loop among the predictions is named as such (issue 17)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.cli import one_error_line, run_cli
from helpers.folders import write_eval_folders, write_probs, write_seg
from helpers.probabilities import SHAPE, sample_cases, softmax


def make_eval_folders(root: Path, n_cases: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """Hand-made ref/ (.nii.gz, labels 0..2) and pred/ (.npz probabilities) folders with a dataset.json beside."""
    rng = np.random.default_rng(seed)
    cases = ((rng.integers(0, 3, SHAPE), softmax(rng.normal(size=(3,) + SHAPE))) for _ in range(n_cases))
    return write_eval_folders(root, cases, 3)


def _probs(pred: Path, case: str) -> np.ndarray:
    return np.load(pred / f"{case}.npz")["probabilities"]


def _corrupt(kind: str, ref: Path, pred: Path) -> None:
    """Break case_1 (the middle case, so case_0 was already evaluated when the error comes)."""
    p = _probs(pred, "case_1")
    if kind == "prediction_without_reference":
        write_probs(pred / "case_9.npz", p)
    elif kind == "reference_without_prediction":
        (pred / "case_1.npz").unlink()
    elif kind == "shape_mismatch":
        write_probs(pred / "case_1.npz", p[:, :, :5])
    elif kind == "wrong_number_of_classes":
        write_probs(pred / "case_1.npz", softmax(np.concatenate([np.log(p), np.zeros((1,) + SHAPE)])))
    elif kind == "not_summing_to_one":
        write_probs(pred / "case_1.npz", p * 0.7)
    elif kind == "logits_not_probabilities":
        write_probs(pred / "case_1.npz", np.log(p))
    elif kind == "nan_probabilities":
        p[1, 2, 3, 4] = np.nan
        write_probs(pred / "case_1.npz", p)
    elif kind == "label_outside_dataset":
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[0, 0, :2] = 7
        write_seg(ref / "case_1.nii.gz", labels)
    elif kind == "corrupt_npz":
        (pred / "case_1.npz").write_bytes(b"not an npz file" * 20)
    elif kind == "truncated_npz":
        data = (pred / "case_1.npz").read_bytes()
        (pred / "case_1.npz").write_bytes(data[: len(data) // 2])
    elif kind == "npz_without_probabilities":
        np.savez_compressed(pred / "case_1.npz", softmax=p)
    elif kind == "corrupt_pkl":
        (pred / "case_1.pkl").write_bytes(pickle.dumps({"spacing": [1, 1, 1]})[:7])
    elif kind == "corrupt_reference":
        (ref / "case_1.nii.gz").write_bytes(b"\x1f\x8b garbage")
    else:
        raise KeyError(kind)


EVALUATE_ERRORS = {
    "prediction_without_reference": ["case_9", "no reference"],
    "reference_without_prediction": ["case_1", "no probabilities", "chill"],
    "shape_mismatch": ["case_1", "spatial shape (4, 5, 5)", "(4, 6, 5)"],
    "wrong_number_of_classes": ["case_1", "4 channels", "3 labels"],
    "not_summing_to_one": ["case_1", "do not sum to 1"],
    "logits_not_probabilities": ["case_1", "outside [0, 1]", "logits"],
    "nan_probabilities": ["case_1", "NaN"],
    "label_outside_dataset": ["case_1", "labels [7]"],
    "corrupt_npz": ["case_1", "cannot read", "case_1.npz", "corrupt"],
    "truncated_npz": ["case_1", "cannot read", "case_1.npz"],
    "npz_without_probabilities": ["case_1", "no 'probabilities'"],
    "corrupt_pkl": ["case_1", "case_1.pkl"],
    "corrupt_reference": ["case_1", "reference", "case_1.nii.gz"],
}


def _evaluate_cli(ref: Path, pred: Path, out: Path, capsys) -> tuple[int, str]:
    """``nnunet-mbls evaluate`` through the console script's entry point (main), in this process."""
    from nnunet_mbls.cli import main

    code = main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(out)])
    return code, capsys.readouterr().err


def test_evaluate_on_sound_hand_made_folders_works(tmp_path, capsys):
    ref, pred = make_eval_folders(tmp_path)
    code, err = _evaluate_cli(ref, pred, tmp_path / "out" / "metrics.json", capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["num_cases"] == 3
    # chill: only the predicted cases are evaluated, references without probabilities are fine
    from nnunet_mbls.calibration.evaluation import evaluate_folder

    (pred / "case_2.npz").unlink()
    assert set(evaluate_folder(ref, pred, chill=True, progress=False)["per_case"]) == {"case_0", "case_1"}


@pytest.mark.parametrize("kind", list(EVALUATE_ERRORS))
def test_evaluate_bad_input_names_case_and_problem_and_writes_nothing(kind, tmp_path, capsys):
    ref, pred = make_eval_folders(tmp_path)
    _corrupt(kind, ref, pred)
    out = tmp_path / "out" / "metrics.json"
    code, err = _evaluate_cli(ref, pred, out, capsys)
    assert code == 1
    errors = [line for line in err.split("\n") if line.startswith("nnunet-mbls evaluate: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err  # one line, no traceback (besides tqdm's progress bar)
    err = errors[0]
    for fragment in EVALUATE_ERRORS[kind]:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert not list(tmp_path.rglob(".nnunet_mbls-partial.*")) and not list(pred.glob("calibration_metrics*"))


def test_evaluate_console_script_fails_cleanly_and_keeps_an_earlier_result(tmp_path):
    """The installed command: exit status 1, one line on stderr; an existing -o file is left as it was."""
    ref, pred = make_eval_folders(tmp_path)
    _corrupt("corrupt_npz", ref, pred)
    out = tmp_path / "metrics.json"
    out.write_text('{"earlier": "result"}\n')
    proc = subprocess.run([str(Path(sys.executable).parent / "nnunet-mbls"), "evaluate", "-ref", str(ref), "-pred",
                           str(pred), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "case_1" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == '{"earlier": "result"}\n'
    assert not out.with_suffix(".png").exists() and not list(tmp_path.glob(".metrics.json.*"))


def test_a_symlink_loop_among_the_predictions_is_named_as_such(tmp_path):
    ref, pred = write_eval_folders(tmp_path, sample_cases(2), 3)
    (pred / "loop.npz").symlink_to(pred / "loop.npz")
    line = one_error_line(run_cli("evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "m.json")),
                           "evaluate")
    assert "loop.npz" in line and "loops or points nowhere" in line and "no reference" not in line, line
    assert not (tmp_path / "m.json").exists()
