"""``nnUNetv2_train``'s flags with our trainers: the calibration step always describes, and is folded into, the
checkpoint whose outputs it was fitted on (real nnU-Net runs on the tiny 3D dataset)."""

from __future__ import annotations

import json

import pytest

from nnunet_mbls.calibration.evaluation.export import weights_id

from helpers.checkpoints import assert_calibration_describes, sha256, weights_of

pytestmark = pytest.mark.integration

TRAINER = "nnUNetTrainerMbLS_bestfirst_test"


@pytest.fixture(scope="module")
def trained(nnunet_3d):
    nn, dataset = nnunet_3d
    nn.train(501, "3d_fullres", TRAINER, "0")
    fold = nn.results / dataset / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    assert weights_id(weights_of(fold / "checkpoint_best.pth")) != weights_id(weights_of(fold / "checkpoint_final.pth"))
    return nn, dataset, fold


def test_training_calibrates_the_final_checkpoint(trained):
    _, _, fold = trained
    assert_calibration_describes(fold, "checkpoint_final.pth")


def test_val_best_calibrates_the_best_checkpoint_and_predict_uses_it(trained, monkeypatch):
    from nnunet_mbls.inference.predict import resolve_folds

    nn, dataset, fold = trained
    final = sha256(fold / "checkpoint_final.pth")
    nn.train(501, "3d_fullres", TRAINER, "0", "--val", "--val_best")
    assert_calibration_describes(fold, "checkpoint_best.pth")
    assert sha256(fold / "checkpoint_final.pth") == final
    nn.apply_env(monkeypatch)
    models = resolve_folds(fold.parent, ["0"], None, True, "501", "3d_fullres", TRAINER, "nnUNetPlans")
    assert models.checkpoint == "checkpoint_best_calibrated.pth"


def test_val_npz_calibrates_the_final_checkpoint_again(trained):
    nn, _, fold = trained
    nn.train(501, "3d_fullres", TRAINER, "0", "--val", "--npz")
    assert_calibration_describes(fold, "checkpoint_final.pth")
    assert sorted(p.name for p in (fold / "validation").glob("*.npz")) == \
        sorted(p.name for p in (fold / "validation_statistics").glob("*.npz"))


def test_continue_after_a_finished_training_recalibrates_the_same_weights(trained):
    nn, _, fold = trained
    before = weights_id(weights_of(fold / "checkpoint_final.pth"))
    nn.train(501, "3d_fullres", TRAINER, "0", "--c")
    assert weights_id(weights_of(fold / "checkpoint_final.pth")) == before
    assert_calibration_describes(fold, "checkpoint_final.pth")


def test_disable_checkpointing_records_the_temperature_without_a_checkpoint(trained):
    nn, dataset, fold = trained
    fold_1 = fold.parent / "fold_1"
    nn.train(501, "3d_fullres", TRAINER, "1", "--disable_checkpointing")
    record = json.loads((fold_1 / "calibration.json").read_text())
    assert record["calibrated_checkpoint"] is None and record["source_checkpoint"] is None
    assert 0.05 <= record["temperature"] <= 20
    assert not list(fold_1.glob("checkpoint*.pth"))
    assert "no calibrated checkpoint written" in "".join(p.read_text() for p in fold_1.glob("training_log_*.txt"))


def test_pretrained_weights_start_and_the_final_checkpoint_is_calibrated(trained):
    nn, _, fold = trained
    proc = nn.train(501, "3d_fullres", TRAINER, "2", "-pretrained_weights", str(fold / "checkpoint_final.pth"))
    assert "pretrained" in (proc.stdout + proc.stderr).lower()
    assert_calibration_describes(fold.parent / "fold_2", "checkpoint_final.pth")
