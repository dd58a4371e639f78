"""nnunet_mbls.inference.predict: ``nnunet-mbls predict`` and ``maps`` against nnU-Net's own predictions.

On a transposed, anisotropic, rotated, two-channel dataset (geometry ``thick_last``) with two folds of a short
MbLS trainer. Independent references: ``nnUNetv2_predict`` of the same folds and checkpoints (segmentation,
ensemble probabilities, each fold's probabilities), numpy formulas for entropy and mutual information, Dice of
nnU-Net's per-fold segmentations, and volumes from the segmentation and the raw image spacing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from helpers.geometry_datasets import GEOMETRIES, Planned, array, planned, read
from helpers.nnunet_fp16 import assert_close_where_fp16_is_normal

pytestmark = pytest.mark.integration  # every test uses the `run` fixture: nnU-Net training and prediction

TRAINER = "nnUNetTrainerMbLS_test"
CASES = ["case_0004", "case_0005"]  # in neither fold's validation set
MAPS = ["probabilities", "confidence", "entropy", "mutual_information"]


class Run:
    """Two trained folds and every prediction the tests compare, made once."""

    def __init__(self, p: Planned):
        self.p = p
        for fold in ("0", "1"):
            p.train(TRAINER, fold)
        self.root = p.nn.root / "predict_tests"
        self.inputs = p.inputs(self.root / "in", CASES)
        self.temperatures = [json.loads((p.fold(TRAINER).parent / f"fold_{f}" / "calibration.json").read_text())["temperature"]
                             for f in (0, 1)]
        self.ours = self.predict("ours", "-f", "0", "1", "--calibrated", "--maps", *MAPS)
        calibrated = "checkpoint_final_calibrated.pth"
        self.nnunet_seg = p.predict(TRAINER, self.root / "nnunet_seg", calibrated, ("0", "1"), CASES, probabilities=False)
        self.nnunet = p.predict(TRAINER, self.root / "nnunet", calibrated, ("0", "1"), CASES)
        self.nnunet_folds = [p.predict(TRAINER, self.root / f"nnunet_fold{f}", calibrated, (f,), CASES) for f in ("0", "1")]

    def predict(self, name: str, *args: str) -> Path:
        out = self.root / name
        self.p.nn.run("nnunet-mbls", "predict", "-i", str(self.inputs), "-o", str(out), "-d", str(self.p.geometry.dataset_id),
                      "-c", self.p.geometry.configuration, "-tr", TRAINER, "-device", "cpu", "-npp", "0", *args)
        return out

    def foreground(self) -> dict[int, str]:
        return {v: k for k, v in self.p.labels.items() if v != 0 and k != "ignore"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run(planned(GEOMETRIES[0], tmp_path_factory))


def map_array(run: Run, folder: Path, case: str, suffix: str) -> np.ndarray:
    return sitk.GetArrayFromImage(read(folder / "maps" / f"{case}_{suffix}.nii.gz")).astype(np.float64)


def numpy_entropy(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=0)


def test_segmentation_and_probability_maps_equal_nnunet_predict(run):
    for case in CASES:
        ours = array(run.ours / f"{case}.nii.gz")
        np.testing.assert_array_equal(ours, array(run.nnunet_seg / f"{case}.nii.gz"))
        probs = np.load(run.nnunet / f"{case}.npz")["probabilities"]
        for label, name in run.foreground().items():
            np.testing.assert_array_equal(map_array(run, run.ours, case, f"prob_{name}"), probs[label])
        np.testing.assert_array_equal(map_array(run, run.ours, case, "confidence"), probs.max(0))


def test_every_map_has_the_input_image_geometry(run):
    for case in CASES:
        image = read(run.p.raw / "imagesTr" / f"{case}_0000.nii.gz")
        maps = sorted((run.ours / "maps").glob(f"{case}_*.nii.gz"))
        assert len(maps) == len(run.foreground()) + 3
        for path in maps:
            m = read(path)
            assert m.GetSize() == image.GetSize() and m.GetPixelID() == sitk.sitkFloat32
            np.testing.assert_allclose(m.GetSpacing(), image.GetSpacing(), rtol=1e-6)
            np.testing.assert_allclose(m.GetOrigin(), image.GetOrigin(), atol=1e-5)
            np.testing.assert_allclose(m.GetDirection(), image.GetDirection(), atol=1e-6)


def test_probabilities_sum_to_one_and_entropy_lies_in_its_range(run):
    num_classes = len(run.foreground()) + 1
    for case in CASES:
        background = 1 - sum(map_array(run, run.ours, case, f"prob_{n}") for n in run.foreground().values())
        probs = np.load(run.nnunet / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(background, probs[0], atol=2e-6)  # the foreground maps sum to 1 - p(background)
        h = map_array(run, run.ours, case, "entropy")
        assert h.min() >= 0 and h.max() <= math.log(num_classes) + 1e-6
        np.testing.assert_allclose(h, numpy_entropy(probs), atol=2e-5)


def test_mutual_information_and_fold_dice_from_each_folds_own_prediction(run):
    qc = {row["case"]: row for row in _csv(run.ours / "qc.csv")}
    for case in CASES:
        folds = [np.load(f / f"{case}.npz")["probabilities"].astype(np.float64) for f in run.nnunet_folds]
        expected = numpy_entropy(np.mean(folds, axis=0)) - np.mean([numpy_entropy(p) for p in folds], axis=0)
        mi = map_array(run, run.ours, case, "mi")
        assert mi.min() >= 0
        np.testing.assert_allclose(mi, expected, atol=5e-5)
        segs = [array(f / f"{case}.nii.gz") for f in run.nnunet_folds]
        dice = []
        for label in run.foreground():
            a, b = segs[0] == label, segs[1] == label
            if a.any() or b.any():
                dice.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
        assert float(qc[case]["mean_fold_dice"]) == pytest.approx(np.mean(dice), abs=1e-9)


def test_qc_volumes_entropies_and_flag_rule(run):
    rows = _csv(run.ours / "qc.csv")
    assert [r["case"] for r in rows] == CASES
    settings = json.loads((run.ours / "qc.json").read_text())
    assert settings["settings"]["folds"] == ["0", "1"] and "mean_fold_dice < 0.8" in settings["flag_rule"]
    for row in rows:
        case = row["case"]
        seg = array(run.ours / f"{case}.nii.gz")
        voxel_ml = np.prod(read(run.p.raw / "imagesTr" / f"{case}_0000.nii.gz").GetSpacing()) / 1000
        for label, name in run.foreground().items():
            assert float(row[f"volume_ml_{name}"]) == pytest.approx(np.sum(seg == label) * voxel_ml, rel=1e-9)
        h = map_array(run, run.ours, case, "entropy")
        assert float(row["mean_entropy_fg"]) == pytest.approx(h[seg != 0].mean(), rel=1e-5)
        assert int(row["flag"]) == int(float(row["mean_fold_dice"]) < 0.8)


def test_one_fold_mutual_information_is_zero_and_calibration_is_the_tempered_prediction(run):
    plain = run.predict("plain_fold0", "-f", "0", "--maps", "probabilities")
    calibrated = run.predict("calibrated_fold0", "-f", "0", "--calibrated", "--maps", "probabilities", "mutual_information",
                             "--flag-score", "mean_entropy_fg", "--flag-threshold", "0.5")
    T = run.temperatures[0]
    for case in CASES:
        assert not map_array(run, calibrated, case, "mi").any()
        p = np.stack([map_array(run, plain, case, f"prob_{n}") for n in run.foreground().values()])
        p = np.concatenate([1 - p.sum(0, keepdims=True), p])
        expected = np.clip(p, 0, 1) ** (1 / T)
        expected /= expected.sum(0, keepdims=True)
        q = np.stack([map_array(run, calibrated, case, f"prob_{n}") for n in run.foreground().values()])
        assert_close_where_fp16_is_normal(q, expected[1:], run.p.sliding_window_weight(case))
    rule = json.loads((calibrated / "qc.json").read_text())["flag_rule"]
    assert "mean_entropy_fg > 0.5" in rule


def test_temperature_fallback_equals_the_calibrated_checkpoint(run):
    """A fold with calibration.json but no calibrated checkpoint: its logits are divided by T instead."""
    source = run.p.fold(TRAINER)
    copy = source.parent.parent / "nnUNetTrainerMbLSDice_test__nnUNetPlans__3d_fullres"
    if not copy.exists():
        shutil.copytree(source.parent, copy, ignore=shutil.ignore_patterns("fold_1", "validation", "calibration"))
        (copy / "fold_0" / "checkpoint_final_calibrated.pth").unlink()
    out = run.root / "fallback"
    run.p.nn.run("nnunet-mbls", "predict", "-i", str(run.inputs), "-o", str(out), "-d", "511", "-c", "3d_fullres",
                 "-f", "0", "-tr", "nnUNetTrainerMbLSDice_test", "--calibrated", "--maps", "probabilities", "-device", "cpu",
                 "-npp", "0")
    folded = run.predict("calibrated_fold0_again", "-f", "0", "--calibrated", "--maps", "probabilities")
    settings = json.loads((out / "qc.json").read_text())["settings"]
    assert settings["calibration"] == "temperatures of calibration.json" and settings["temperatures_applied_to_logits"] == [run.temperatures[0]]
    for case in CASES:
        fallback, checkpoint = (np.stack([map_array(run, folder, case, f"prob_{name}") for name in run.foreground().values()])
                                for folder in (out, folded))
        assert_close_where_fp16_is_normal(fallback, checkpoint, run.p.sliding_window_weight(case))


def test_maps_command_on_a_save_probabilities_folder_in_uint8(run, tmp_path):
    out = tmp_path / "maps_uint8"
    run.p.nn.run("nnunet-mbls", "maps", "-i", str(run.nnunet), "-o", str(out), "--maps", "probabilities", "confidence",
                 "--maps-dtype", "uint8")
    num_classes = len(run.foreground()) + 1
    for case in CASES:
        probs = np.load(run.nnunet / f"{case}.npz")["probabilities"]
        total = np.zeros(probs.shape[1:])
        for label, name in run.foreground().items():
            path = out / "maps" / f"{case}_prob_{name}.nii.gz"
            header = nibabel.load(path).header
            assert header.get_data_dtype() == np.uint8 and np.asarray(nibabel.load(path).dataobj.slope) == pytest.approx(1 / 255)
            shown = map_array(run, out, case, f"prob_{name}")  # SimpleITK applies the slope, as viewers do
            assert np.abs(shown - probs[label]).max() <= 0.5 / 255 + 1e-6
            total += shown
        background = probs[0]
        assert np.abs(total + background - 1).max() <= (num_classes - 1) * 0.5 / 255 + 1e-5
        assert (out / "maps" / f"{case}_prob_{name}.nii.gz").stat().st_size < (run.ours / "maps" / f"{case}_prob_{name}.nii.gz").stat().st_size
    assert [r["case"] for r in _csv(out / "qc.csv")] == CASES


@pytest.mark.parametrize("args, message", [
    (["-f", "0", "3"], "fold 3: .*checkpoint_final.pth does not exist.*nnUNetv2_train Dataset511_ThickLast 3d_fullres 3"),
    (["-f", "0", "-chk", "checkpoint_nope.pth"], "checkpoint_nope.pth does not exist"),
    (["-f", "0", "-tr", "nnUNetTrainerCE_test", "--calibrated"], "no calibration.*nnunet-mbls calibrate -d Dataset511_ThickLast"),
    (["-f", "0", "--flag-score", "mean_fold_dice", "--flag-threshold", "0.9"], "needs at least 2 folds"),
])
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(run, tmp_path, args, message):
    import re

    if "nnUNetTrainerCE_test" in args:  # a trained fold that was never calibrated
        fold = run.p.fold("nnUNetTrainerCE_test")
        if not fold.exists():
            shutil.copytree(run.p.fold(TRAINER).parent, fold.parent, ignore=shutil.ignore_patterns(
                "fold_1", "validation", "calibration*", "*calibrated.pth"))
    out = tmp_path / "out"
    tr = [] if "-tr" in args else ["-tr", TRAINER]
    proc = run.p.nn.run("nnunet-mbls", "predict", "-i", str(run.inputs), "-o", str(out), "-d", "511", "-c", "3d_fullres",
                        *tr, "-device", "cpu", "-npp", "0", *args, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


def test_output_inside_input_and_unknown_map_kind_are_refused(run):
    proc = run.p.nn.run("nnunet-mbls", "predict", "-i", str(run.inputs), "-o", str(run.inputs / "out"), "-d", "511",
                        "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu", check=False)
    assert proc.returncode == 1 and "in the input folder -i" in proc.stderr and not (run.inputs / "out").exists()
    proc = run.p.nn.run("nnunet-mbls", "predict", "-i", str(run.inputs), "-o", str(run.root / "x"), "-d", "511",
                        "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "--maps", "variance", check=False)
    assert proc.returncode == 2 and "invalid choice: 'variance'" in proc.stderr and not (run.root / "x").exists()


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_refuses_to_write_into_the_previous_stage_predictions(tmp_path):
    """The cascade's low-res segmentations (-prev_stage_predictions) are an input: -o may not overwrite them."""
    from nnunet_mbls.inference.predict import PredictionInputError, check_folders

    images, lowres = tmp_path / "images", tmp_path / "lowres"
    images.mkdir()
    lowres.mkdir()
    with pytest.raises(PredictionInputError, match="-prev_stage_predictions"):
        check_folders(images, lowres, [], lowres)
    check_folders(images, tmp_path / "out", [], lowres)  # a separate output folder is fine
