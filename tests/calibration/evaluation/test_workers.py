"""nnunet_mbls.calibration.evaluation.workers: ``evaluate`` over cases in worker processes (``-np``) gives the
serial results, with the same clear error for a bad case, and the number of workers is checked.

Speed is measured in benchmarks/bench_evaluate_parallel.py, not here.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers.folders import make_box_folders


def test_evaluate_with_workers_gives_the_serial_result(tmp_path, capsys):
    """Per case, mean and pooled, bit for bit (as JSON), through the command line's -np."""
    from nnunet_mbls.cli import main

    ref, pred = make_box_folders(tmp_path)
    outputs = {}
    for np_ in ("1", "2"):
        out = tmp_path / f"np{np_}" / "metrics.json"
        code = main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-pfile", str(tmp_path / "plans.json"),
                     "--region", "all", "-np", np_, "-o", str(out)])
        assert code == 0, capsys.readouterr().err
        outputs[np_] = json.loads(out.read_text())
    serial, parallel = outputs["1"], outputs["2"]
    assert serial["num_cases"] == 5
    assert serial["per_case"]["case_1"]["n_voxels"] == 8 * 14 * 10  # the crop box was used
    assert json.dumps(serial["per_case"], sort_keys=True) == json.dumps(parallel["per_case"], sort_keys=True)
    assert json.dumps(serial["pooled"], sort_keys=True) == json.dumps(parallel["pooled"], sort_keys=True)
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)


def test_a_bad_case_in_a_worker_is_the_same_clear_error(tmp_path):
    from nnunet_mbls.calibration.evaluation import EvaluationError, evaluate_folder

    ref, pred = make_box_folders(tmp_path, n_cases=3)
    (pred / "case_1.npz").write_bytes(b"not an npz file" * 20)
    with pytest.raises(EvaluationError, match=r"case case_1: cannot read .*case_1\.npz.*corrupt"):
        evaluate_folder(ref, pred, progress=False, num_processes=2)


def test_number_of_processes(tmp_path, monkeypatch):
    import nnunetv2.configuration

    from nnunet_mbls.calibration import evaluation

    ref, pred = make_box_folders(tmp_path, n_cases=3)
    files = sorted(pred.glob("*.npz"))
    assert evaluation.resolve_num_processes(8, files) == 3  # at most one per case
    assert evaluation.resolve_num_processes(1, files) == 1
    assert evaluation.resolve_num_processes(None, files) == 1  # a small folder: workers would cost more than they save
    monkeypatch.setattr(evaluation.workers, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 2)
    assert evaluation.resolve_num_processes(None, files) == min(2, len(os.sched_getaffinity(0)))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_processes"):
            evaluation.resolve_num_processes(bad, files)
