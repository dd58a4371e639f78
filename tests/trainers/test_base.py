"""nnunet_mbls.trainers.base: every trainer builds its loss with the ignore label, a NaN loss or input stops
training with a clear error, an interrupted training resumes with the same loss and hyper-parameters, rerunning
validation is idempotent, and a wrong-typed hyper-parameter names the trainer (robustness, issue 6)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch


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


def test_trainer_names_itself_in_a_loss_kwargs_error():
    """A trainer subclass with a wrong-typed hyper-parameter: the error names the class and its loss_kwargs."""
    from types import SimpleNamespace

    from nnunet_mbls.trainers import nnUNetTrainerMbLS

    class nnUNetTrainerMbLS_text(nnUNetTrainerMbLS):
        loss_kwargs = {"margin": "10", "lam": 0.1}

    trainer = object.__new__(nnUNetTrainerMbLS_text)  # no plans needed to build the loss
    trainer.label_manager = SimpleNamespace(ignore_label=None, has_regions=False)
    with pytest.raises(ValueError, match=r"^nnUNetTrainerMbLS_text\.loss_kwargs: margin='10' is invalid.*margin=10\)$"):
        trainer.build_plain_loss()


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
