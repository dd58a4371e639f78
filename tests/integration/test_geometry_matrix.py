"""The whole chain over the geometries nnU-Net handles, with real nnU-Net commands on tiny generated data.

Per geometry: ``nnUNetv2_plan_and_preprocess``, a short subclass of our trainers (training, nnU-Net's
validation, our calibration step), ``nnUNetv2_predict -chk checkpoint_final_calibrated.pth``,
``nnunet-mbls evaluate`` and ``nnunet-mbls benchmark --collect``. Together the datasets cover:

============  ===========================================================================================
thick_last    3D, spacing (1, 1, 3): transpose_forward [2, 0, 1]; rotated direction cosines and an origin;
              2 input channels; ignore label; a zero border, so nnU-Net's crop box is a real crop
thick_middle  3D, spacing (1, 3, 1): transpose_forward [1, 0, 2]; 31 classes; a class absent from a case;
              foreground touching the image border, crop box = the whole image
flat_2d       2D (2d configuration); 2 input channels; ignore label; direction and origin; zero border
============  ===========================================================================================

Every expected value is computed here from the raw files, independently of the code under test: the
crop box from the raw image's nonzero voxels (nnU-Net crops to them), voxel counts from the reference
labels, tempered probabilities as normalize(p ** (1/T)) of nnU-Net's own uncalibrated prediction.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nnunet_mbls.geometry import crop_box

from helpers.geometry_datasets import GEOMETRIES, VALIDATION, Geometry, Planned, array, planned, read
from helpers.nnunet_fp16 import assert_close_where_fp16_is_normal

pytestmark = pytest.mark.integration  # every test plans/trains/predicts with nnU-Net


@dataclass
class Chain:
    """One geometry taken through training, calibration, calibrated prediction, evaluation and the table."""

    planned: Planned
    fold: Path
    calibration: dict
    predicted: Path
    predicted_calibrated: Path
    evaluation_all: dict
    results: dict


@pytest.fixture(scope="module", params=GEOMETRIES, ids=[g.name for g in GEOMETRIES])
def chain(request, tmp_path_factory) -> Chain:
    geometry: Geometry = request.param
    p = planned(geometry, tmp_path_factory)
    fold = p.train(geometry.trainer, "0", "--npz")  # --npz: the validation probabilities are kept
    root = p.nn.root / "chain"
    plain = p.predict(geometry.trainer, root / "plain")
    calibrated = p.predict(geometry.trainer, root / "calibrated", "checkpoint_final_calibrated.pth")
    metrics = root / "evaluation_all.json"
    p.nn.run("nnunet-mbls", "evaluate", "-ref", str(p.gt), "-pred", str(calibrated), "--region", "all", "--chill",
             "-o", str(metrics))
    p.nn.run("nnunet-mbls", "benchmark", "-d", str(geometry.dataset_id), "-c", geometry.configuration, "-f", "0",
             "-tr", geometry.trainer, "--baseline", geometry.trainer, "--collect", "-o", str(root / "bench"))
    return Chain(p, fold, json.loads((fold / "calibration.json").read_text()), plain, calibrated,
                 json.loads(metrics.read_text()), json.loads((root / "bench" / p.dataset / "results.json").read_text()))


def test_plans_move_the_thick_axis_first(chain):
    plans = json.loads((chain.planned.nn.preprocessed / chain.planned.dataset / "nnUNetPlans.json").read_text())
    assert plans["transpose_forward"] == chain.planned.geometry.transpose_forward


def test_crop_box_of_every_case_maps_to_the_reference_and_matches_nnunet_export(chain):
    p = chain.planned
    num_classes = len([k for k in p.labels if k != "ignore"])
    for case in VALIDATION:
        with open(chain.fold / "validation" / f"{case}.pkl", "rb") as f:
            properties = pickle.load(f)
        ref = array(p.gt / f"{case}.nii.gz")
        box = crop_box(properties, p.geometry.transpose_forward, ref.shape)
        assert box == p.independent_crop_box(case)
        if p.geometry.dataset.get("zero_margin"):
            assert np.prod([b - a for a, b in box]) < ref.size  # a real crop
        else:
            assert box == [[0, s] for s in ref.shape]
        # nnU-Net's own export: background probability exactly 1 outside the box, not everywhere inside it
        probs = np.load(chain.fold / "validation" / f"{case}.npz")["probabilities"]
        assert probs.shape == (num_classes, *ref.shape)
        inside = np.zeros(ref.shape, bool)
        inside[tuple(slice(a, b) for a, b in box)] = True
        assert np.all(probs[0][~inside] == 1) and not np.all(probs[0][inside] == 1)


def test_calibration_step_fits_on_the_crop_box_voxels_and_scores_foreground(chain):
    p = chain.planned
    # below max_voxels the fit's subsample is every voxel of the crop boxes, ignore label excluded
    assert chain.calibration["fit"]["subsample_size"] == sum(p.crop_box_voxels(c) for c in VALIDATION)
    assert 0.05 <= chain.calibration["temperature"] <= 20
    assert (chain.fold / "checkpoint_final_calibrated.pth").is_file()
    before = json.loads((chain.fold / "calibration" / "evaluation_before.json").read_text())
    for case in VALIDATION:
        assert before["per_case"][case]["n_voxels"] == p.foreground_voxels(case)


def test_calibrated_prediction_is_the_tempered_prediction_in_the_input_geometry(chain):
    p, T = chain.planned, chain.calibration["temperature"]
    for case in VALIDATION:
        probs = np.load(chain.predicted / f"{case}.npz")["probabilities"].astype(np.float64)
        probs_t = np.load(chain.predicted_calibrated / f"{case}.npz")["probabilities"]
        expected = probs ** (1 / T)
        expected /= expected.sum(0, keepdims=True)
        assert_close_where_fp16_is_normal(probs_t, expected, p.sliding_window_weight(case))
        image, seg = read(p.raw / "imagesTr" / f"{case}_0000.nii.gz"), read(chain.predicted_calibrated / f"{case}.nii.gz")
        assert seg.GetSize() == image.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing())
        np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)


def test_evaluate_scores_the_crop_box_of_a_prediction_folder(chain):
    for case in VALIDATION:
        assert chain.evaluation_all["per_case"][case]["n_voxels"] == chain.planned.crop_box_voxels(case)


def test_benchmark_collect_tabulates_the_fold_with_nnunets_dice(chain):
    row = chain.results["rows"][chain.planned.geometry.trainer]
    assert chain.results["missing_cells"] == [] and row["num_cases"] == len(VALIDATION)
    summary = json.loads((chain.fold / "validation" / "summary.json").read_text())
    per_case = [np.nanmean([m["Dice"] for m in entry["metrics"].values()]) for entry in summary["metric_per_case"]]
    assert row["dice_before"]["mean"] == pytest.approx(np.nanmean(per_case), rel=1e-9)


def test_a_class_absent_from_a_case_is_reported_not_scored(chain):
    p = chain.planned
    before = json.loads((chain.fold / "calibration" / "evaluation_before.json").read_text())
    for case in VALIDATION:
        ref = array(p.gt / f"{case}.nii.gz")
        absent = [name for name, value in p.labels.items() if value != 0 and name != "ignore" and not (ref == value).any()]
        metrics = before["per_case"][case]
        assert sorted(metrics["empty_reference"]) == sorted(absent)
        for name in absent:
            assert np.isnan(metrics["hd95"][name])
    if p.geometry.name == "thick_middle":
        assert len([k for k in p.labels if k != "ignore"]) >= 30
        assert "adjacent" in before["per_case"]["case_0001"]["empty_reference"]


def test_calibrate_a_stock_model_on_a_transposed_dataset(tmp_path_factory):
    """Regression: ``nnunet-mbls calibrate`` on a stock fold of a dataset whose plans transpose the axes."""
    p = planned(GEOMETRIES[0], tmp_path_factory)
    p.train("nnUNetTrainerStock_test", "0", "--npz")
    p.nn.run("nnunet-mbls", "calibrate", "-d", str(p.geometry.dataset_id), "-c", p.geometry.configuration, "-f", "0",
             "-tr", "nnUNetTrainerStock_test", "-device", "cpu")
    calibration = json.loads((p.fold("nnUNetTrainerStock_test") / "calibration.json").read_text())
    assert calibration["fit"]["subsample_size"] == sum(p.crop_box_voxels(c) for c in VALIDATION)
    assert calibration["calibrated_checkpoint"] == "checkpoint_final_calibrated.pth"


def test_streamed_statistics_equal_evaluate_on_nnunets_own_npz_export(chain):
    """The calibration step read the statistics streamed out of the export, not the .npz (kept by --npz here); every
    calibration metric as trained equals `evaluate` on nnU-Net's own .npz of the same cases, and on these small folds
    (every voxel in the samples) so do T and the metrics after T."""
    from nnunet_mbls.calibration.evaluation import evaluate_folder
    from nnunet_mbls.calibration.folds.step import fit_temperature_on

    p = chain.planned
    assert chain.calibration["statistics"]["source"].startswith("statistics streamed")
    assert chain.calibration["statistics"]["metrics_after_temperature"] == "exact"
    assert sorted(f.name for f in (chain.fold / "validation_statistics").iterdir()) == [f"{c}.npz" for c in VALIDATION]
    dataset_json = json.loads((chain.fold.parent / "dataset.json").read_text())
    npz_route = fit_temperature_on(p.gt, [chain.fold / "validation"], dataset_json, chain.fold.parent / "plans.json",
                                   "fg", "all", 10**6, 0, progress=False)
    assert chain.calibration["temperature"] == pytest.approx(npz_route.temperature, rel=1e-5)
    for stage, expected in (("before", npz_route.before), ("after", npz_route.after)):
        streamed = json.loads((chain.fold / "calibration" / f"evaluation_{stage}.json").read_text())
        for case in VALIDATION:
            for key in ("ece", "cece", "nll", "brier", "mce", "ece_adaptive", "n_voxels"):
                assert streamed["per_case"][case][key] == pytest.approx(expected["per_case"][case][key], rel=1e-6, abs=1e-6), (stage, case, key)
            assert streamed["per_case"][case]["dice"] == pytest.approx(expected["per_case"][case]["dice"], nan_ok=True)
        for key in ("ece", "cece", "nll", "brier"):
            assert streamed["pooled"][key] == pytest.approx(expected["pooled"][key], rel=1e-6, abs=1e-6)
