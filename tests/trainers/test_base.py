"""Robustness (issue 6): bad input gets a clear error naming the case/argument and the fix, half precision
and DDP give the single-process float32 values, interrupted runs resume, and nothing is ever lost or
left half-written.

Rows of the issue covered elsewhere: region-based datasets are refused at trainer start
(test_nnunet_integration.py::test_region_based_dataset_is_refused_at_trainer_start); an ignore-label dataset
trains end to end with CE and is scored without its ignored voxels
(test_nnunet_integration.py::test_dataset_with_ignore_label_trains_and_ignored_voxels_are_not_scored);
degenerate temperature fits return the bounds (test_temperature.py::test_fit_degenerate_inputs_return_finite_bounds);
a calibrate rerun is idempotent (test_nnunet_integration.py::test_calibrate_stock_model_and_predict_with_the_folded_checkpoint);
calibrate without a checkpoint names the training command
(test_nnunet_integration.py::test_calibrate_without_a_trained_model_says_what_to_run); the benchmark resumes an
interrupted fold (test_benchmark.py::test_interrupted_benchmark_training_continues_from_the_latest_checkpoint).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_folders import make_fold, write_eval_folders, write_probs, write_seg

IGNORE = 4  # the synthetic dataset's labels are 0..3; nnU-Net's ignore label is the next integer


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_logs(folder: Path) -> list[str]:
    return [p.read_text() for p in sorted(folder.glob("training_log_*.txt"))]


# ------------------------------------------------------------------ in-process trainers on the planned 3D dataset
@pytest.fixture
def trainer_factory(nnunet_3d, monkeypatch, tmp_path):
    """Build trainers in this process from the planned fixture's plans; their logs go to tmp_path."""
    nn, dataset = nnunet_3d
    nn.apply_env(monkeypatch)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # keep the shared results folder clean
    plans = dict(json.loads((nn.preprocessed / dataset / "nnUNetPlans.json").read_text()), continue_training=False)
    base_json = json.loads((nn.preprocessed / dataset / "dataset.json").read_text())

    def make(cls, ignore_label: bool = False):
        dataset_json = copy.deepcopy(base_json)
        if ignore_label:
            dataset_json["labels"]["ignore"] = IGNORE
        # nnU-Net pops keys from the plans dict: a fresh copy per trainer
        return cls(copy.deepcopy(plans), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))

    return make


@pytest.mark.integration
def test_every_trainer_builds_its_loss_with_the_ignore_label_and_ignored_voxels_get_no_gradient(trainer_factory):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnunet_mbls.trainers import TRAINERS

    g = torch.Generator().manual_seed(0)
    for cls in TRAINERS:
        trainer = trainer_factory(cls, ignore_label=True)
        assert trainer.label_manager.ignore_label == IGNORE
        loss = trainer._build_loss()
        assert isinstance(loss, DeepSupervisionWrapper), cls.__name__
        assert loss.loss.ignore_label == IGNORE, cls.__name__
        scales = trainer._get_deep_supervision_scales()
        assert len(scales) == len(loss.weight_factors) >= 2
        num_classes = trainer.label_manager.num_segmentation_heads
        assert num_classes == 4  # the ignore label is not a softmax channel
        logits, targets = [], []
        for scale in scales:
            shape = tuple(max(2, round(16 * s)) for s in scale)
            logits.append((torch.randn((2, num_classes) + shape, generator=g) * 3).requires_grad_())
            target = torch.randint(0, num_classes, (2, 1) + shape, generator=g)
            target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
            targets.append(target.to(torch.int16))  # nnU-Net's target dtype
        value = loss(logits, targets)
        value.backward()
        assert torch.isfinite(value), cls.__name__
        for x, t, w in zip(logits, targets, loss.weight_factors):
            if w == 0:
                continue
            ignored = (t == IGNORE).expand_as(x)
            assert ignored.any() and torch.isfinite(x.grad).all()
            assert (x.grad[ignored] == 0).all(), f"{cls.__name__}: ignored voxels got a gradient"
            assert (x.grad[~ignored] != 0).any(), cls.__name__
        # changing the logits of ignored voxels does not change the loss
        moved = [x.detach().clone() for x in logits]
        for x, t in zip(moved, targets):
            ignored = (t == IGNORE).expand_as(x)
            x[ignored] = torch.randn(int(ignored.sum()), generator=g) * 30
        assert loss(moved, targets).item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), cls.__name__


def test_online_ece_excludes_ignored_voxels():
    from nnunet_mbls.trainers.online_ece import OnlineECE

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 7, 5, generator=g) * 2
    target = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
    ece = OnlineECE(num_classes=4)
    state = ece.batch_state(logits, target, ignore_label=IGNORE)
    ignored = (target == IGNORE).expand_as(logits)
    moved = logits.clone()
    moved[ignored] = torch.randn(int(ignored.sum()), generator=g) * 30
    np.testing.assert_array_equal(ece.batch_state(moved, target, ignore_label=IGNORE), state)
    # an ignored voxel counts like a background one (neither is scored in the foreground ECE) ...
    as_background = torch.where(target == IGNORE, 0, target)
    np.testing.assert_array_equal(ece.batch_state(logits, as_background, ignore_label=IGNORE), state)
    # ... and unlike a foreground one
    as_class_1 = torch.where(target == IGNORE, 1, target)
    assert not np.array_equal(ece.batch_state(logits, as_class_1, ignore_label=IGNORE), state)


def test_online_ece_equals_a_naive_foreground_ece_of_the_whole_batch():
    from nnunet_mbls.trainers.online_ece import OnlineECE

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (3, 1, 5, 6), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    # naive: every voxel of the batch whose label is foreground and not ignored, 15 bins (lower, upper]
    p = torch.softmax(logits, dim=1).movedim(1, -1).reshape(-1, 4).numpy()
    t = target.reshape(-1).numpy()
    keep = (t != 0) & (t != IGNORE)
    conf, hit = p[keep].max(axis=1), (p[keep].argmax(axis=1) == t[keep]).astype(float)
    gap = 0.0
    for b in range(15):
        lower, upper = b / 15, (b + 1) / 15
        in_bin = (conf > lower) & (conf <= upper)
        gap += abs(hit[in_bin].sum() - conf[in_bin].sum())
    online = OnlineECE(num_classes=4)
    assert online.ece_from_state(online.batch_state(logits, target, ignore_label=IGNORE)) == pytest.approx(
        gap / keep.sum(), rel=1e-6)


# ------------------------------------------------------------------ bad hyper-parameters: argument AND value named
@pytest.mark.parametrize(
    "make, named",
    [
        (lambda L: L.MbLSLoss(margin=-1), "margin=-1"),
        (lambda L: L.MbLSLoss(margin=float("nan")), "margin=nan"),
        (lambda L: L.MbLSLoss(lam=-0.1), "lam=-0.1"),
        (lambda L: L.MbLSDiceLoss(margin=-2.5), "margin=-2.5"),
        (lambda L: L.FocalLoss(gamma=-1), "gamma=-1"),
        (lambda L: L.LabelSmoothingLoss(alpha=1.0), "alpha=1.0"),
        (lambda L: L.EntropyPenaltyLoss(alpha=1.5), "alpha=1.5"),
        (lambda L: L.SVLSLoss(sigma=0), "sigma=0"),
        (lambda L: L.NACLLoss(kernel_size=4), "kernel_size=4"),
        (lambda L: L.NACLLoss(alpha=-0.2), "alpha=-0.2"),
        (lambda L: L.CELoss(ignore_label=-1), "ignore_label=-1"),
        (lambda L: L.build_loss("mbls", margin=-3.0), "margin=-3.0"),
    ],
)
def test_bad_hyper_parameter_error_names_argument_and_value(make, named):
    import nnunet_mbls.losses as L

    with pytest.raises(ValueError) as info:
        make(L)
    assert named in str(info.value)


# ------------------------------------------------------------------ half precision, extreme logits
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("margin", [10.0, 1e5], ids=["default_margin", "huge_margin"])
def test_extreme_half_precision_logits_give_finite_float32_values(dtype, margin):
    """±6e4 logits (near fp16's max; the margin penalty of m = 10 is then ~1e5 per voxel): the loss equals the
    float32 loss of the same rounded logits, and no gradient is NaN/Inf, for every loss."""
    from nnunet_mbls.losses import LOSSES, build_loss

    g = torch.Generator().manual_seed(2)
    sign = torch.randn(2, 3, 4, 5, 3, generator=g).sign()
    scale = torch.rand(2, 3, 4, 5, 3, generator=g) * 6e4
    target = torch.randint(0, 3, (2, 1, 4, 5, 3), generator=g)
    for name in LOSSES:
        logits = (sign * scale).to(dtype).requires_grad_()
        assert logits.abs().max().item() > 5e4
        kwargs = {"margin": margin, "lam": 0.1} if name.startswith("mbls") else {}
        loss = build_loss(name, **kwargs)
        value = loss(logits, target)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert torch.isfinite(logits.grad.float()).all(), name
        reference = loss(logits.detach().float(), target)
        assert value.item() == pytest.approx(reference.item(), rel=1e-6), name


# ------------------------------------------------------------------ NaN during training: a clear error
def _batch_for(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    patch = tuple(trainer.configuration_manager.patch_size)
    data = torch.randn((1, trainer.num_input_channels) + patch, generator=g)
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        shape = tuple(round(p * s) for p, s in zip(patch, scale))
        targets.append(torch.randint(0, 4, (1, 1) + shape, generator=g).to(torch.int16))
    return {"data": data, "target": targets}


@pytest.mark.integration
def test_train_step_raises_floating_point_error_when_the_loss_becomes_nan(trainer_factory):
    from nnunet_mbls.trainers import nnUNetTrainerMbLS

    trainer = trainer_factory(nnUNetTrainerMbLS)
    trainer.initialize()
    sound = copy.deepcopy(trainer.network.state_dict())
    first = trainer.train_step(_batch_for(trainer))  # a finite step passes
    assert np.isfinite(first["loss"])

    with torch.no_grad():
        trainer.network.decoder.seg_layers[-1].weight.fill_(float("nan"))  # a diverged head: NaN logits
    with pytest.raises(FloatingPointError) as info:
        trainer.train_step(_batch_for(trainer, seed=1))
    message = str(info.value)
    assert "nnUNetTrainerMbLS" in message and "nan" in message.lower() and "epoch 0" in message
    assert "learning rate" in message and "checkpoint_latest.pth" in message

    # NaN/Inf in the input images: the same error, not a silently NaN model
    trainer.network.load_state_dict(sound)
    batch = _batch_for(trainer, seed=2)
    batch["data"][0, 0, 0, 0, 0] = float("inf")
    batch["data"][0, 0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        trainer.train_step(batch)


# ------------------------------------------------------------------ evaluate: bad folders give errors naming the case
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0))
    return (e / e.sum(0)).astype(np.float32)


SHAPE = (4, 6, 5)


def make_eval_folders(root: Path, n_cases: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """Hand-made ref/ (.nii.gz, labels 0..2) and pred/ (.npz probabilities) folders with a dataset.json beside."""
    rng = np.random.default_rng(seed)
    cases = ((rng.integers(0, 3, SHAPE), _softmax(rng.normal(size=(3,) + SHAPE))) for _ in range(n_cases))
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
        write_probs(pred / "case_1.npz", _softmax(np.concatenate([np.log(p), np.zeros((1,) + SHAPE)])))
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


# ------------------------------------------------------------------ calibrate: missing prerequisites, degenerate fits
def test_calibrate_with_a_checkpoint_but_no_validation_probabilities_says_what_to_run(tmp_path, monkeypatch):
    from nnunet_mbls.calibration.folds import CalibrationStepError, calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    fold = make_fold(tmp_path, {"case_0": (labels, None)}, ["case_0"])
    write_seg(fold / "validation" / "case_0.nii.gz", labels)  # segmentations alone (validation without --npz)
    with pytest.raises(CalibrationStepError) as info:
        calibrate_output_folder(fold, progress=False)
    assert "no .npz probabilities" in str(info.value)
    assert "nnUNetv2_train Dataset777_Hand 3d_fullres 0 -tr Tr -p nnUNetPlans --val --npz" in str(info.value)
    assert not (fold / "calibration.json").exists() and not (fold / "checkpoint_final_calibrated.pth").exists()


def test_calibrate_refuses_an_incomplete_validation_folder(tmp_path, monkeypatch):
    """An interrupted validation must not be calibrated (and benchmarked) on a silent subset of its cases."""
    from nnunet_mbls.calibration.folds import CalibrationStepError, calibrate_output_folder

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    rng = np.random.default_rng(3)
    cases = {f"case_{i}": (rng.integers(0, 3, SHAPE), _softmax(rng.normal(size=(3,) + SHAPE))) for i in range(3)}
    cases["case_1"] = (cases["case_1"][0], None)  # its .npz was never written
    cases["case_2"] = (cases["case_2"][0], None)  # not a validation case of fold 0: not expected
    fold = make_fold(tmp_path, cases, val_cases=["case_0", "case_1"])
    with pytest.raises(CalibrationStepError, match=r"validation cases \['case_1'\] \(1 of 2.*--val --npz"):
        calibrate_output_folder(fold, progress=False)
    assert not (fold / "calibration.json").exists()


def test_degenerate_temperature_fit_is_finite_bounded_and_reported(tmp_path, monkeypatch):
    """One class only and every voxel right: T goes to the documented lower bound, finite, and is reported."""
    from nnunet_mbls.calibration.folds import calibrate_output_folder
    from nnunet_mbls.defaults import T_BOUNDS

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    labels = np.zeros(SHAPE, dtype=np.uint8)  # background only
    probs = np.stack([np.full(SHAPE, 0.8), np.full(SHAPE, 0.15), np.full(SHAPE, 0.05)]).astype(np.float32)
    fold = make_fold(tmp_path, {"case_0": (labels, probs), "case_1": (labels, probs)}, ["case_0", "case_1"])
    messages = []
    summary = calibrate_output_folder(fold, progress=False, log=lambda *a: messages.append(" ".join(map(str, a))))
    assert summary["temperature"] == T_BOUNDS[0] and summary["temperature_at_bound"] == "lower"
    written = json.loads((fold / "calibration.json").read_text())
    assert written["temperature"] == T_BOUNDS[0] and written["temperature_bounds"] == list(T_BOUNDS)
    assert any("lower bound" in m for m in messages), messages
    folded = torch.load(fold / "checkpoint_final_calibrated.pth", weights_only=False)
    assert folded["mbls_temperature"] == pytest.approx(T_BOUNDS[0])
    assert torch.isfinite(folded["network_weights"]["decoder.seg_layers.0.weight"]).all()


# ------------------------------------------------------------------ an interrupted training resumed with --c, then --val
RESUME_TRAINER = "nnUNetTrainerFocal_resume_test"


@pytest.fixture(scope="module")
def resumed_fold(nnunet_3d):
    """Focal test trainer killed after epoch 0, then resumed with ``nnUNetv2_train ... --c`` to the end."""
    nn, dataset = nnunet_3d
    fold = nn.fold_folder(dataset, RESUME_TRAINER, "3d_fullres")
    env = nn.env
    nn.env = dict(env, MBLS_TEST_CRASH_AFTER_EPOCH="0")
    try:
        crashed = nn.train(501, "3d_fullres", RESUME_TRAINER, "0", check=False)
    finally:
        nn.env = env
    resumed = nn.train(501, "3d_fullres", RESUME_TRAINER, "0", "--c")
    return nn, fold, crashed, resumed


@pytest.mark.integration
def test_interrupted_training_resumes_with_the_same_loss_and_hyper_parameters(resumed_fold):
    nn, fold, crashed, resumed = resumed_fold
    assert crashed.returncode != 0 and "simulated crash after epoch 0" in crashed.stderr
    first, second = training_logs(fold)  # one log per nnUNetv2_train run
    loss_line = "nnunet-mbls loss: FocalLoss (focal) {'gamma': 3.0}, ignore_label=None, deep supervision=True"
    assert loss_line in first and loss_line in second
    epochs = [re.findall(r": Epoch (\d+)\s*$", log, re.M) for log in (first, second)]
    assert epochs == [["0"], ["1"]]  # the second run continued at epoch 1 instead of restarting
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2 and len(checkpoint["logging"]["train_losses"]) == 2
    assert len(checkpoint["logging"]["val_fg_ece"]) == 2  # the online ECE of both runs is in the log
    assert not (fold / "checkpoint_latest.pth").exists()
    assert (fold / "calibration.json").is_file() and (fold / "checkpoint_final_calibrated.pth").is_file()


@pytest.mark.integration
def test_rerunning_validation_is_idempotent_and_replaces_the_calibrated_checkpoint_atomically(resumed_fold):
    nn, fold, _, _ = resumed_fold
    final = fold / "checkpoint_final.pth"
    calibrated = fold / "checkpoint_final_calibrated.pth"
    before = {
        "final": sha256(final),
        "final_mtime": final.stat().st_mtime_ns,
        "calibrated_inode": calibrated.stat().st_ino,
        "T": json.loads((fold / "calibration.json").read_text())["temperature"],
        "validation": sorted(p.name for p in (fold / "validation").iterdir()),
        "fold": sorted(p.name for p in fold.iterdir() if not p.name.startswith("training_log")),
    }
    nn.train(501, "3d_fullres", RESUME_TRAINER, "0", "--val")
    assert sha256(final) == before["final"] and final.stat().st_mtime_ns == before["final_mtime"]
    assert json.loads((fold / "calibration.json").read_text())["temperature"] == before["T"]
    assert sorted(p.name for p in (fold / "validation").iterdir()) == before["validation"]
    assert sorted(p.name for p in fold.iterdir() if not p.name.startswith("training_log")) == before["fold"]
    # replaced by a rename (a new inode), never rewritten in place; same temperature folded in
    assert calibrated.stat().st_ino != before["calibrated_inode"]
    folded = torch.load(calibrated, map_location="cpu", weights_only=False)
    assert folded["mbls_temperature"] == pytest.approx(before["T"])
    assert not list(fold.rglob(".nnunet_mbls-partial.*"))


# ------------------------------------------------------------------ two-process DDP (gloo on CPU)
def _ddp_inputs(world: int):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2 * world, 3, 6, 5, 4, generator=g) * 4
    target = torch.randint(0, 3, (2 * world, 1, 6, 5, 4), generator=g)
    ecetarget = target.clone()
    ecetarget[torch.rand(target.shape, generator=g) < 0.2] = 3  # ignore label for the ECE check
    return logits, target, ecetarget


def _losses(ddp: bool):
    from nnunet_mbls.losses import LOSSES, build_loss

    return {name: build_loss(name, **({"margin": 2.0, "lam": 0.3, "batch_dice": True, "ddp": ddp}
                                      if name == "mbls_dice" else {"margin": 2.0, "lam": 0.3} if name == "mbls" else {}))
            for name in LOSSES}


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from nnunet_mbls.trainers.online_ece import OnlineECE, sum_over_ranks

    torch.set_num_threads(1)
    # a file rendezvous: no fixed port that another job on a shared machine could take
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        logits, target, ecetarget = _ddp_inputs(world)
        part = slice(2 * rank, 2 * rank + 2)  # equal shares, as nnU-Net's per-GPU batch
        out = {}
        local = _losses(ddp=False)
        for name, loss in _losses(ddp=True).items():
            x = logits[part].clone().requires_grad_()
            value = loss(x, target[part])
            value.backward()
            out[name] = (value.item(), x.grad)
            out[name + "_this_rank_only"] = local[name](logits[part], target[part]).item()
        state = OnlineECE(num_classes=3).batch_state(logits[part], ecetarget[part], ignore_label=3)
        out["ece"] = OnlineECE(num_classes=3).ece_from_state(sum_over_ranks(state))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_losses_gradients_and_online_ece_equal_single_process(tmp_path):
    """nnU-Net averages gradients over ranks; every loss (incl. Dice+CE+margin with batch Dice, whose tp/fp/fn
    nnU-Net gathers across ranks) then gives the single-process full-batch loss and gradients, and the summed
    online-ECE states the full-batch ECE. Equal voxel counts per rank: with an ignore label, CE-type losses
    average per-rank means, exactly as stock nnU-Net's CE does."""
    from nnunet_mbls.trainers.online_ece import OnlineECE

    world = 2
    torch.multiprocessing.spawn(_ddp_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    logits, target, ecetarget = _ddp_inputs(world)
    for name, loss in _losses(ddp=False).items():
        x = logits.clone().requires_grad_()
        full = loss(x, target)
        full.backward()
        mean_over_ranks = sum(r[name][0] for r in ranks) / world
        assert mean_over_ranks == pytest.approx(full.item(), rel=1e-5), name
        if name == "mbls_dice":  # the Dice statistics really were gathered: a rank alone gives another value
            assert ranks[0][name][0] != pytest.approx(ranks[0][name + "_this_rank_only"], rel=1e-4)
        # DDP's all-reduce averages the gradients of the ranks: each rank's share equals the full-batch gradient
        ddp_grad = torch.cat([r[name][1] for r in ranks]) / world
        torch.testing.assert_close(ddp_grad, x.grad, rtol=1e-4, atol=1e-8, msg=name)
    single = OnlineECE(num_classes=3).batch_state(logits, ecetarget, ignore_label=3)
    expected = OnlineECE(num_classes=3).ece_from_state(single)
    assert ranks[0]["ece"] == pytest.approx(expected, abs=1e-12) and ranks[1]["ece"] == ranks[0]["ece"]


# ------------------------------------------------------------------ disk full / permission denied while writing
def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_disk_full_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    from nnunet_mbls.io import atomic_write, atomic_write_json

    target = tmp_path / "calibration.json"
    atomic_write_json(target, {"temperature": 1.5})
    old = target.read_bytes()

    def half_then_full(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"temperature": 2.')  # a truncated JSON reaches the disk ...
            f.flush()
        _enospc()  # ... then the disk is full

    with pytest.raises(OSError) as info:
        atomic_write(target, half_then_full)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "nothing was changed" in str(info.value)
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]


def test_atomic_write_permission_denied_and_unserialisable_json_change_nothing(tmp_path, monkeypatch):
    from nnunet_mbls import io

    target = tmp_path / "evaluation.json"
    io.atomic_write_json(target, {"a": 1})
    old = target.read_bytes()

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    with monkeypatch.context() as m:  # as root chmod does not deny: the rename is refused instead
        m.setattr(io.os, "replace", denied)
        with pytest.raises(PermissionError, match="could not write .*evaluation.json"):
            io.atomic_write_json(target, {"a": 2})
    with monkeypatch.context() as m:  # no space even for the temporary file
        m.setattr(io, "_partial_folder", _enospc)
        with pytest.raises(OSError, match="could not write .*evaluation.json.*nothing was changed"):
            io.atomic_write_json(target, {"a": 3})
    with pytest.raises(TypeError):
        io.atomic_write_json(target, {"a": object()})
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]


def test_folding_into_a_checkpoint_on_a_full_disk_keeps_both_checkpoints_intact(tmp_path, monkeypatch):
    from nnunet_mbls.calibration.checkpoint import fold_temperature_into_checkpoint

    head = torch.nn.Conv3d(4, 3, 1)
    src, dst = tmp_path / "checkpoint_final.pth", tmp_path / "checkpoint_final_calibrated.pth"
    torch.save({"network_weights": {"decoder.seg_layers.0.weight": head.weight.detach(),
                                    "decoder.seg_layers.0.bias": head.bias.detach()}}, src)
    fold_temperature_into_checkpoint(src, dst, 1.5)
    src_bytes, dst_bytes = src.read_bytes(), dst.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        _enospc()

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError) as info:
        fold_temperature_into_checkpoint(src, dst, 2.0, overwrite=True)
    assert info.value.errno == errno.ENOSPC and "checkpoint_final_calibrated.pth" in str(info.value)
    assert src.read_bytes() == src_bytes and dst.read_bytes() == dst_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pth", "checkpoint_final_calibrated.pth"]
