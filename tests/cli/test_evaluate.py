"""nnunet_mbls.cli.evaluate: an output (``-o``) over the command's own inputs is refused and changes nothing
(issue 17)."""

from __future__ import annotations

import pickle

import pytest

from helpers.cli import one_error_line, run_cli
from helpers.folders import digest, write_eval_folders
from helpers.probabilities import sample_cases


@pytest.mark.parametrize("target", ["pred/case_0.npz", "pred/case_1.pkl", "ref/case_0.nii.gz", "dataset.json",
                                    "pred/case_0.json", "ref/new.json", "pred"])
def test_evaluate_refuses_an_output_over_its_inputs_and_changes_nothing(tmp_path, target):
    ref, pred = write_eval_folders(tmp_path, sample_cases(2), 3)
    with open(pred / "case_1.pkl", "wb") as f:
        pickle.dump({"spacing": [1.0, 1.0, 1.0]}, f)
    before = digest(tmp_path)
    proc = run_cli("evaluate", "-ref", str(ref), "-pred", str(pred), "-djfile", str(tmp_path / "dataset.json"),
                "-o", str(tmp_path / target))
    line = one_error_line(proc, "evaluate")
    assert str(tmp_path / target) in line and ("input" in line) and "write the output" in line, line
    assert digest(tmp_path) == before


def test_evaluate_output_through_a_symlink_onto_an_input_is_refused(tmp_path):
    from nnunet_mbls.io import refuse_outputs_over_inputs

    ref, pred = write_eval_folders(tmp_path, sample_cases(1), 3)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "metrics.json"
    link.symlink_to(pred / "case_0.npz")
    with pytest.raises(ValueError, match="is the input"):
        refuse_outputs_over_inputs({"-o": link}, {"-pred files": list(pred.glob("*.npz"))})
    # the default output (inside -pred, a name of ours) stays allowed, and so does a rerun over it
    for _ in range(2):
        proc = run_cli("evaluate", "-ref", str(ref), "-pred", str(pred))
        assert proc.returncode == 0, proc.stderr
    assert (pred / "calibration_metrics_fg.json").is_file() and (pred / "calibration_metrics_fg.png").is_file()
