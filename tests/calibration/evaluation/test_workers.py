"""``evaluate`` and the calibration step over cases in worker processes (``-np``): the same results as serially.

Speed is measured in benchmarks/bench_evaluate_parallel.py, not here.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_folders import write_eval_folders

SHAPE = (10, 14, 12)
CLASSES = 4


def _case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3D labels 0..3 (nested boxes with noise) and over-confident probabilities around them."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for k in range(1, CLASSES):
        lo = [k + int(rng.integers(0, 2)) for _ in SHAPE]
        labels[tuple(slice(a, s - a) for a, s in zip(lo, SHAPE))] = k
    z = rng.normal(size=(CLASSES,) + SHAPE) + 3.0 * np.eye(CLASSES)[labels].transpose(3, 0, 1, 2)
    e = np.exp(2 * (z - z.max(0)))
    return labels, (e / e.sum(0)).astype(np.float32)


def make_folders(root: Path, n_cases: int = 5, seed: int = 0) -> tuple[Path, Path]:
    """ref/ (.nii.gz) and pred/ (.npz + .pkl with a crop box for one case) with a dataset.json beside."""
    rng = np.random.default_rng(seed)
    ref, pred = write_eval_folders(root, (_case(rng) for _ in range(n_cases)), CLASSES)
    with open(pred / "case_1.pkl", "wb") as f:  # nnU-Net's crop box (no transpose here): not every voxel is "all"
        pickle.dump({"bbox_used_for_cropping": [[1, 9], [0, 14], [2, 12]], "shape_before_cropping": SHAPE,
                     "spacing": [2.0, 1.5, 1.0]}, f)
    (root / "plans.json").write_text(json.dumps({"transpose_forward": [0, 1, 2]}))
    return ref, pred


def test_evaluate_with_workers_gives_the_serial_result(tmp_path, capsys):
    """Per case, mean and pooled, bit for bit (as JSON), through the command line's -np."""
    from nnunet_mbls.cli import main

    ref, pred = make_folders(tmp_path)
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


def make_fold(root: Path, n_cases: int = 6) -> Path:
    """The folders above laid out as a trained fold (as test_robustness.make_fold, 3D, 4 classes)."""
    ref, pred = make_folders(root / "cases", n_cases)
    dataset = "Dataset779_Parallel"
    gt = root / "preprocessed" / dataset / "gt_segmentations"
    gt.parent.mkdir(parents=True)
    ref.rename(gt)
    (gt.parent / "splits_final.json").write_text(json.dumps([{"train": [], "val": [f"case_{i}" for i in range(n_cases)]}]))
    fold = root / "results" / dataset / "Tr__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    pred.rename(fold / "validation")
    (root / "cases" / "dataset.json").rename(fold.parent / "dataset.json")
    (root / "cases" / "plans.json").rename(fold.parent / "plans.json")
    head = torch.nn.Conv3d(8, CLASSES, 1)
    torch.save({"network_weights": {"decoder.seg_layers.0.weight": head.weight.detach(),
                                    "decoder.seg_layers.0.bias": head.bias.detach()}}, fold / "checkpoint_final.pth")
    return fold


def test_calibration_step_with_workers_fits_the_serial_temperature(tmp_path, monkeypatch):
    """Same subsample, same T, same metrics before and after; the subsample is capped (max_voxels < the voxels)."""
    import nnunetv2.paths

    from nnunet_mbls.calibration.folds import calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    fold = make_fold(tmp_path)
    summaries, details = {}, {}
    for n in (1, 2):
        summaries[n] = calibrate_output_folder(fold, max_voxels=2000, seed=3, progress=False, log=lambda *a: None,
                                               num_processes=n)
        details[n] = [(fold / "calibration" / f).read_text() for f in ("evaluation_before.json", "evaluation_after.json")]
    assert summaries[1]["fit"]["subsample_size"] == 2000 < 6 * np.prod(SHAPE)
    assert summaries[1]["temperature"] == summaries[2]["temperature"]
    assert 0.05 < summaries[1]["temperature"] < 20
    assert json.dumps(summaries[1], sort_keys=True) == json.dumps(summaries[2], sort_keys=True)
    assert details[1] == details[2]


def test_subsample_of_per_case_keys_does_not_depend_on_the_order_of_the_cases():
    from nnunet_mbls.calibration.subsample import VoxelSubsampler, case_candidates

    rng = np.random.default_rng(1)
    cases = {f"case_{i}": _case(rng) for i in range(4)}
    candidates = {name: case_candidates(name, probs, labels.astype(np.int64), labels >= 0, max_voxels=1500, seed=7)
                  for name, (labels, probs) in cases.items()}
    samples = []
    for order in (["case_0", "case_1", "case_2", "case_3"], ["case_3", "case_1", "case_0", "case_2"]):
        sub = VoxelSubsampler(max_voxels=1500, seed=7)
        for name in order:
            sub.add_candidates(candidates[name])
        samples.append(sub.arrays())
        assert sub.n_seen == 4 * np.prod(SHAPE)
    assert torch.equal(samples[0][0], samples[1][0]) and torch.equal(samples[0][1], samples[1][1])
    assert samples[0][1].numel() == 1500
    # a case's keys depend on the seed and its name only
    again = case_candidates("case_0", cases["case_0"][1], cases["case_0"][0].astype(np.int64), None,
                            max_voxels=1500, seed=7)
    np.testing.assert_array_equal(again.keys, candidates["case_0"].keys)
    other_seed = case_candidates("case_0", cases["case_0"][1], cases["case_0"][0].astype(np.int64), None,
                                 max_voxels=1500, seed=8)
    assert not np.array_equal(other_seed.keys, candidates["case_0"].keys)


def test_a_bad_case_in_a_worker_is_the_same_clear_error(tmp_path):
    from nnunet_mbls.calibration.evaluation import EvaluationError, evaluate_folder

    ref, pred = make_folders(tmp_path, n_cases=3)
    (pred / "case_1.npz").write_bytes(b"not an npz file" * 20)
    with pytest.raises(EvaluationError, match=r"case case_1: cannot read .*case_1\.npz.*corrupt"):
        evaluate_folder(ref, pred, progress=False, num_processes=2)


def test_number_of_processes(tmp_path, monkeypatch):
    import nnunetv2.configuration

    from nnunet_mbls.calibration import evaluation

    ref, pred = make_folders(tmp_path, n_cases=3)
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
