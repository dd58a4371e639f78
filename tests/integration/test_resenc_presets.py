"""The residual-encoder presets (``nnUNetPlannerResEncM``, plans ``nnUNetResEncUNetMPlans``): our trainers, the
calibration step, ``predict --calibrated --maps``, vector scaling and the benchmark on real nnU-Net runs (2d and
3d_fullres; the test trainer caps the planned GPU batch at 2 patches for the CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mbls.data.synthetic import make_synthetic_dataset

from helpers.checkpoints import assert_calibration_describes, head_key, weights_of
from helpers.nnunet import NnUNet
from helpers.nnunet_fp16 import assert_close_where_fp16_is_normal, sliding_window_weight

pytestmark = pytest.mark.integration

PLANS = "nnUNetResEncUNetMPlans"
TRAINER = "nnUNetTrainerMbLS_cpubatch_test"


@pytest.fixture(scope="module")
def resenc(tmp_path_factory):
    """A tiny 3D dataset planned with nnUNetPlannerResEncM, trained (fold 0) in 3d_fullres and 2d."""
    nn = NnUNet(tmp_path_factory.mktemp("resenc"))
    folder = make_synthetic_dataset(nn.raw, dataset_id=506, name="ResEnc", num_cases=8, shape=(24, 32, 32), seed=3)
    nn.run("nnUNetv2_plan_and_preprocess", "-d", "506", "-c", "3d_fullres", "2d", "-pl", "nnUNetPlannerResEncM",
           "-np", "1", "-npfp", "1")
    for configuration in ("3d_fullres", "2d"):
        nn.train(506, configuration, TRAINER, "0", "-p", PLANS)
    return nn, folder.name


def fold_of(nn: NnUNet, dataset: str, configuration: str):
    return nn.results / dataset / f"{TRAINER}__{PLANS}__{configuration}" / "fold_0"


def test_plans_are_the_residual_encoder_preset(resenc):
    nn, dataset = resenc
    plans = json.loads((nn.preprocessed / dataset / f"{PLANS}.json").read_text())
    for configuration, conv in (("3d_fullres", "Conv3d"), ("2d", "Conv2d")):
        architecture = plans["configurations"][configuration]["architecture"]
        assert architecture["network_class_name"].endswith("ResidualEncoderUNet")
        assert architecture["arch_kwargs"]["conv_op"].endswith(conv)
        assert plans["configurations"][configuration]["batch_size"] > 2  # the GPU batch the test trainer caps


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_calibration_step_folds_T_into_the_residual_encoder_head(resenc, configuration):
    nn, dataset = resenc
    fold = fold_of(nn, dataset, configuration)
    record = assert_calibration_describes(fold, "checkpoint_final.pth")
    assert record["statistics"]["source"].startswith("statistics streamed")
    assert head_key(weights_of(fold / "checkpoint_final.pth")).startswith("decoder.seg_layers.")


def test_calibrated_probabilities_and_maps_equal_nnunet_probabilities_to_the_power_1_over_T(resenc, tmp_path):
    nn, dataset = resenc
    fold = fold_of(nn, dataset, "3d_fullres")
    T = json.loads((fold / "calibration.json").read_text())["temperature"]
    case = "case_0001"
    inputs, image = tmp_path / "in", nn.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz"
    probabilities = nn.predict_probabilities(506, dataset, case, "3d_fullres", TRAINER,
                                             ("checkpoint_final.pth", "checkpoint_final_calibrated.pth"), tmp_path, PLANS)
    expected = probabilities["checkpoint_final.pth"] ** (1 / T)
    expected /= expected.sum(0, keepdims=True)
    weight = sliding_window_weight(nn.preprocessed / dataset / f"{PLANS}.json", "3d_fullres", [image])
    assert_close_where_fp16_is_normal(probabilities["checkpoint_final_calibrated.pth"], expected, weight)

    out = tmp_path / "ours"
    nn.run("nnunet-mbls", "predict", "-i", str(inputs), "-o", str(out), "-d", "506", "-c", "3d_fullres", "-f", "0",
           "-tr", TRAINER, "-p", PLANS, "--calibrated", "--maps", "probabilities", "-device", "cpu")
    labels = json.loads((nn.raw / dataset / "dataset.json").read_text())["labels"]
    for name, k in labels.items():
        if k == 0:
            continue
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / f"{case}_prob_{name}.nii.gz")))
        np.testing.assert_allclose(written, probabilities["checkpoint_final_calibrated.pth"][k], atol=1e-4)


def test_benchmark_and_vector_scaling_take_the_plans(resenc, tmp_path):
    from nnunet_mbls.calibration.folds import calibration_problem

    nn, dataset = resenc
    fold = fold_of(nn, dataset, "3d_fullres")
    nn.run("nnunet-mbls", "benchmark", "-d", "506", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "--baseline", TRAINER,
           "-p", PLANS, "--collect", "-o", str(tmp_path / "bench"))
    results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
    assert TRAINER in json.dumps(results)
    nn.run("nnunet-mbls", "benchmark", "-d", "506", "-c", "3d_fullres", "-f", "1", "-tr", TRAINER, "-p", PLANS,
           "--emit-jobs", str(tmp_path / "jobs"), "-o", str(tmp_path / "bench"))
    jobs = (tmp_path / "jobs" / "jobs.txt").read_text()
    assert f"nnUNetv2_train 506 3d_fullres 1 -tr {TRAINER} -p {PLANS}" in jobs
    assert f"nnunet-mbls calibrate -d 506 -c 3d_fullres -f 1 -tr {TRAINER} -p {PLANS}" in jobs

    nn.run("nnunet-mbls", "calibrate", "-d", "506", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", PLANS,
           "--method", "vector", "-device", "cpu")
    record = json.loads((fold / "calibration.json").read_text())
    assert calibration_problem(fold) is None
    scale = np.array(record["vector_scaling"]["scale"])
    head = head_key(weights_of(fold / "checkpoint_final.pth"))
    calibrated, trained = weights_of(fold / "checkpoint_final_calibrated.pth")[head], weights_of(fold / "checkpoint_final.pth")[head]
    np.testing.assert_allclose(calibrated.numpy(), trained.numpy() * scale.reshape((-1,) + (1,) * (trained.ndim - 1)),
                               rtol=1e-5, atol=1e-7)


def test_find_best_configuration_ensemble_postprocessing_and_one_T_for_the_ensemble_of_configurations(resenc, tmp_path):
    """nnU-Net's downstream commands on our trainers' outputs, and calibrate -c 2d 3d_fullres: one T fitted on the
    averaged out-of-fold probabilities, applied by apply-temperature to nnUNetv2_ensemble's output."""
    import pickle

    nn, dataset = resenc
    folds = {c: fold_of(nn, dataset, c) for c in ("2d", "3d_fullres")}
    for configuration in folds:
        nn.train(506, configuration, TRAINER, "0", "-p", PLANS, "--val", "--npz")
    nn.run("nnUNetv2_find_best_configuration", "506", "-c", "2d", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0",
           "-np", "1")
    information = json.loads((nn.results / dataset / "inference_information.json").read_text())
    best = information["best_model_or_ensemble"]
    assert best["postprocessing_file"].endswith("postprocessing.pkl")

    nn.run("nnunet-mbls", "calibrate", "-d", "506", "-c", "2d", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", PLANS)
    name = f"ensemble___{TRAINER}__{PLANS}__2d___{TRAINER}__{PLANS}__3d_fullres___0"
    record = json.loads((nn.results / dataset / "ensembles" / name / "calibration.json").read_text())
    T = record["temperature"]
    assert record["configurations"] == [folds["2d"].parent.name, folds["3d_fullres"].parent.name]

    cases = sorted(p.name[: -len(".npz")] for p in (folds["2d"] / "validation").glob("*.npz"))
    averaged, labels = {}, {}
    for case in cases:
        averaged[case] = np.mean([np.load(f / "validation" / f"{case}.npz")["probabilities"].astype(np.float64)
                                  for f in folds.values()], axis=0)
        box = pickle.loads((folds["2d"] / "validation" / f"{case}.pkl").read_bytes())["bbox_used_for_cropping"]
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(nn.preprocessed / dataset / "gt_segmentations" / f"{case}.nii.gz")))
        labels[case] = (tuple(slice(a, b) for a, b in box), ref)

    def nll(t: float) -> float:  # mean NLL of normalize(p^(1/t)) over every crop-box voxel of the cases
        total, n = 0.0, 0
        for case, p in averaged.items():
            inside, ref = labels[case]
            q = np.clip(p[(slice(None), *inside)], 1e-12, 1) ** (1 / t)
            q /= q.sum(0, keepdims=True)
            total -= np.log(np.take_along_axis(q, ref[inside][None].astype(np.int64), 0).clip(1e-12)).sum()
            n += ref[inside].size
        return total / n

    assert record["fit"]["subsample_size"] == sum(labels[c][1][labels[c][0]].size for c in cases)  # every voxel
    assert nll(T) <= min(nll(T * 1.05), nll(T / 1.05))  # T minimises the ensemble's NLL

    ensemble, calibrated = tmp_path / "ensemble", tmp_path / "calibrated"
    predictions = []  # each configuration's out-of-fold .npz as a prediction folder (nnUNetv2_predict adds the jsons)
    for configuration, fold in folds.items():
        predicted = tmp_path / configuration
        predicted.mkdir()
        for f in [*fold.glob("validation/*.npz"), *fold.glob("validation/*.pkl"), fold.parent / "dataset.json",
                  fold.parent / "plans.json"]:
            (predicted / f.name).symlink_to(f)
        predictions.append(str(predicted))
    nn.run("nnUNetv2_ensemble", "-i", *predictions, "-o", str(ensemble), "--save_npz", "-np", "1")
    nn.run("nnunet-mbls", "apply-temperature", "-i", str(ensemble), "-o", str(calibrated), "--calibration-json",
           str(nn.results / dataset / "ensembles" / name / "calibration.json"))
    for case, p in averaged.items():
        expected = p ** (1 / T)
        expected /= expected.sum(0, keepdims=True)
        np.testing.assert_allclose(np.load(calibrated / f"{case}.npz")["probabilities"], expected, atol=1e-5)

    postprocessed = tmp_path / "postprocessed"
    nn.run("nnUNetv2_apply_postprocessing", "-i", str(ensemble), "-o", str(postprocessed), "-pp_pkl_file",
           best["postprocessing_file"], "-np", "1", "-plans_json", str(folds["2d"].parent / "plans.json"))
    for case in cases:
        segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(postprocessed / f"{case}.nii.gz")))
        assert segmentation.shape == labels[case][1].shape and set(np.unique(segmentation)) <= {0, 1, 2, 3}
