"""nnunet_mbls.calibration.folds.ensemble (and .vector_scaling): one calibration for an ensemble of folds.

One temperature for the fold ensemble, a held-out calibration set, the fit region, and vector scaling, on the
transposed, rotated, two-channel dataset (``thick_last``) with two folds of stock nnU-Net (test budget). Kept in one
module: its ``folds`` fixture trains two folds.

Independent references: the temperature minimising the NLL of the pooled out-of-fold voxels found with
scipy's bounded scalar minimiser on numpy arrays read from nnU-Net's files (crop boxes from the raw images),
and ``nnUNetv2_predict`` of the uncalibrated ensemble tempered by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from helpers.geometry_datasets import GEOMETRIES, VALIDATION, VALIDATION_FOLD_1, array, planned
from helpers.nnunet_fp16 import assert_close_where_fp16_is_normal, fp16_normal

pytestmark = pytest.mark.integration  # every test uses the `folds` fixture: nnU-Net training of two folds

TRAINER = "nnUNetTrainerStockFolds_test"
HELD_OUT = ["case_0004", "case_0005"]


def nll_fit(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """argmin_T mean NLL of softmax(log p / T), by scipy's bounded Brent on log T (independent of our Newton)."""
    def nll(log_t: float) -> float:
        z = log_softmax(log_probs / np.exp(log_t), axis=1)
        return -float(np.mean(z[np.arange(labels.size), labels]))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20)), method="bounded",
                                        options={"xatol": 1e-9}).x))


def voxels(p, case: str, probabilities: np.ndarray, region: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """(log p rows, labels) of the crop-box (or foreground) voxels of a case, ignore label excluded."""
    ref = array(p.raw / "labelsTr" / f"{case}.nii.gz").astype(np.int64)
    mask = np.zeros(ref.shape, bool)
    if region == "all":
        mask[tuple(slice(a, b) for a, b in p.independent_crop_box(case))] = True
    else:
        mask = ref != 0
    mask &= ref != p.labels["ignore"]
    return np.log(np.maximum(probabilities[:, mask].T.astype(np.float64), 1e-12)), ref[mask]


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    p = planned(GEOMETRIES[0], tmp_path_factory)
    for fold in ("0", "1"):
        p.train(TRAINER, fold, "--npz")
    return p


@pytest.fixture(scope="module")
def ensemble(folds) -> dict:
    """``nnunet-mbls calibrate -f 0 1``: one temperature for the ensemble of both folds (its calibration_ensemble.json)."""
    folds.nn.run("nnunet-mbls", "calibrate", "-d", "511", "-c", "3d_fullres", "-f", "0", "1", "-tr", TRAINER,
                 "-device", "cpu")
    return json.loads((folds.fold(TRAINER).parent / "calibration_ensemble.json").read_text())


def test_shared_temperature_equals_an_independent_fit_on_the_pooled_out_of_fold_cases(folds, ensemble):
    p = folds
    trainer_folder = p.fold(TRAINER).parent
    rows, labels, own = [], [], {}
    for fold, cases in (("0", VALIDATION), ("1", VALIDATION_FOLD_1)):
        fold_rows = [voxels(p, c, np.load(trainer_folder / f"fold_{fold}" / "validation" / f"{c}.npz")["probabilities"])
                     for c in cases]
        own[fold] = nll_fit(np.concatenate([r for r, _ in fold_rows]), np.concatenate([y for _, y in fold_rows]))
        rows += [r for r, _ in fold_rows]
        labels += [y for _, y in fold_rows]
    shared = nll_fit(np.concatenate(rows), np.concatenate(labels))
    assert ensemble["temperature"] == pytest.approx(shared, rel=1e-4)
    assert ensemble["folds"] == ["0", "1"] and ensemble["fit"]["subsample_size"] == sum(y.size for y in labels)
    for fold in ("0", "1"):
        record = json.loads((trainer_folder / f"fold_{fold}" / "calibration.json").read_text())
        assert record["temperature"] == pytest.approx(own[fold], rel=1e-4)  # the fold's own T stays recorded
        assert record["checkpoint_temperature"] == ensemble["temperature"]
        assert "calibration_ensemble.json" in record["checkpoint_calibration"]
        checkpoint = torch.load(trainer_folder / f"fold_{fold}" / "checkpoint_final_calibrated.pth", weights_only=False)
        assert checkpoint["mbls_temperature"] == pytest.approx(ensemble["temperature"])
        assert "optimizer_state" not in checkpoint  # the calibrated checkpoint is for inference
    assert (trainer_folder / "calibration_ensemble" / "reliability.png").stat().st_size > 1000
    # --if-missing: the ensemble is current, nothing is redone
    proc = p.nn.run("nnunet-mbls", "calibrate", "-d", "511", "-c", "3d_fullres", "-f", "0", "1", "-tr", TRAINER,
                    "--if-missing")
    assert "nothing to do" in proc.stdout


def test_nnunet_predict_with_the_calibrated_checkpoints_returns_the_tempered_ensemble(folds, ensemble):
    p = folds
    T = ensemble["temperature"]
    root = p.nn.root / "ensemble_tests"
    plain = p.predict(TRAINER, root / "plain", "checkpoint_final.pth", ("0", "1"), HELD_OUT)
    calibrated = p.predict(TRAINER, root / "calibrated", "checkpoint_final_calibrated.pth", ("0", "1"), HELD_OUT)
    worst = 0.0
    for case in HELD_OUT:
        ensemble = np.load(plain / f"{case}.npz")["probabilities"].astype(np.float64)
        expected = ensemble ** (1 / T)
        expected /= expected.sum(0, keepdims=True)
        got = np.load(calibrated / f"{case}.npz")["probabilities"]
        weight = p.sliding_window_weight(case)
        assert_close_where_fp16_is_normal(got, expected, weight)
        worst = max(worst, float(np.abs(got - expected)[:, fp16_normal(weight)].max()))
    # `pytest -s` prints the measured maximum (docs/BENCHMARKS.md quotes it)
    print(f"\nlargest |calibrated ensemble - tempered ensemble| where nnU-Net's fp16 weights are normal: {worst:.2e} (T = {T:.3f})")


def test_calibration_set_fits_the_ensemble_output_on_held_out_labels(folds, tmp_path):
    p = folds
    images = p.inputs(tmp_path / "images", HELD_OUT)
    labels = tmp_path / "labels"
    labels.mkdir()
    for case in HELD_OUT:
        (labels / f"{case}.nii.gz").symlink_to(p.raw / "labelsTr" / f"{case}.nii.gz")
    p.nn.run("nnunet-mbls", "calibrate", "-d", "511", "-c", "3d_fullres", "-f", "0", "1", "-tr", TRAINER,
             "--calibration-set", str(images), str(labels), "-device", "cpu")
    ensemble = json.loads((p.fold(TRAINER).parent / "calibration_ensemble.json").read_text())
    assert ensemble["fit_data"]["calibration_set"]["images"] == str(images.resolve()) and ensemble["num_cases"] == 2
    deployed = p.predict(TRAINER, tmp_path / "deployed", "checkpoint_final.pth", ("0", "1"), HELD_OUT)
    rows = [voxels(p, c, np.load(deployed / f"{c}.npz")["probabilities"]) for c in HELD_OUT]
    expected = nll_fit(np.concatenate([r for r, _ in rows]), np.concatenate([y for _, y in rows]))
    assert ensemble["temperature"] == pytest.approx(expected, rel=1e-4)
    assert not list(p.fold(TRAINER).parent.glob(".calibration_set_*"))  # the temporary predictions are gone
    for fold in ("0", "1"):
        record = json.loads((p.fold(TRAINER).parent / f"fold_{fold}" / "calibration.json").read_text())
        assert record["checkpoint_temperature"] == ensemble["temperature"]


def test_fit_region_fg_fits_on_the_foreground_voxels(folds):
    p = folds
    p.nn.run("nnunet-mbls", "calibrate", "-d", "511", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "--fit-region", "fg",
             "-device", "cpu")
    record = json.loads((p.fold(TRAINER) / "calibration.json").read_text())
    rows = [voxels(p, c, np.load(p.fold(TRAINER) / "validation" / f"{c}.npz")["probabilities"], "fg") for c in VALIDATION]
    assert record["fit"]["fit_region"] == "fg" and record["fit"]["subsample_size"] == sum(y.size for _, y in rows)
    assert record["temperature"] == pytest.approx(nll_fit(np.concatenate([r for r, _ in rows]),
                                                          np.concatenate([y for _, y in rows])), rel=1e-4)
    assert record["checkpoint_calibration"] == "this fold's temperature"


def test_vector_scaling_folded_into_the_ensemble_equals_the_map_on_nnunets_logits(folds, monkeypatch):
    """nnUNetv2_predict -f 0 1 -chk checkpoint_final_calibrated.pth == softmax(scale * ensemble logits + bias),
    the logits from nnU-Net's own predictor API with the uncalibrated checkpoints."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = folds
    p.nn.apply_env(monkeypatch)
    p.nn.run("nnunet-mbls", "calibrate", "-d", "511", "-c", "3d_fullres", "-f", "0", "1", "-tr", TRAINER,
             "--method", "vector", "--no-fallback", "-device", "cpu")
    trainer_folder = p.fold(TRAINER).parent
    record = json.loads((trainer_folder / "calibration_ensemble.json").read_text())
    assert record["method"]["requested"] == "vector" and record["method"]["chosen"] in ("vector", "temperature")
    assert "cross-validated NLL over 4 cases" in record["method"]["reason"]
    scale, bias = np.array(record["vector_scaling"]["scale"]), np.array(record["vector_scaling"]["bias"])
    for fold in ("0", "1"):
        own = json.loads((trainer_folder / f"fold_{fold}" / "calibration.json").read_text())
        assert own["checkpoint_calibration"].startswith("vector scaling shared by folds")
    calibrated = p.predict(TRAINER, p.nn.root / "vector_tests" / "calibrated", "checkpoint_final_calibrated.pth",
                           ("0", "1"), HELD_OUT)
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trainer_folder), [0, 1], "checkpoint_final.pth")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    for case in HELD_OUT:
        images = sorted(str(f) for f in (p.raw / "imagesTr").glob(f"{case}_*.nii.gz"))
        data, _, properties = preprocessor.run_case(images, None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float().numpy()
        mapped = logits * scale[:, None, None, None] + bias[:, None, None, None]
        _, expected = convert_predicted_logits_to_segmentation_with_correct_shape(
            mapped.astype(np.float32), predictor.plans_manager, predictor.configuration_manager,
            predictor.label_manager, properties, return_probabilities=True)
        got = np.load(calibrated / f"{case}.npz")["probabilities"]
        assert_close_where_fp16_is_normal(got, expected, p.sliding_window_weight(case))


def test_vector_scaling_of_one_fold_records_its_choice(folds):
    p = folds
    p.nn.run("nnunet-mbls", "calibrate", "-d", "511", "-c", "3d_fullres", "-f", "1", "-tr", TRAINER,
             "--method", "vector", "-device", "cpu")
    record = json.loads((p.fold(TRAINER).parent / "fold_1" / "calibration.json").read_text())
    assert record["method"]["requested"] == "vector" and "cross-validated NLL over 2 cases" in record["method"]["reason"]
    checkpoint = torch.load(p.fold(TRAINER).parent / "fold_1" / "checkpoint_final_calibrated.pth", weights_only=False)
    if record["method"]["chosen"] == "temperature":  # fell back: the ordinary temperature calibration ran
        assert "does not beat temperature" in record["method"]["reason"]
        assert checkpoint["mbls_temperature"] == pytest.approx(record["temperature"])
    else:
        assert checkpoint["mbls_logit_affine"]["scale"] == pytest.approx(record["vector_scaling"]["scale"])
