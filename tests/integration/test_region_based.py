"""Region-based datasets (overlapping regions, one sigmoid per region) with our trainers on real nnU-Net runs: the
sigmoid MbLS loss, per-region temperatures folded into the head, and the streamed metrics against nnU-Net's own
exported probabilities."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mbls.data.synthetic import make_synthetic_dataset

from helpers.checkpoints import head_key, sha256, weights_of
from helpers.nnunet import NnUNet
from helpers.nnunet_fp16 import assert_close_where_fp16_is_normal, fp16_normal, sliding_window_weight

pytestmark = pytest.mark.integration

TRAINER = "nnUNetTrainerMbLS_test"
REGIONS = {"whole": (1, 2, 3), "inner": (2,)}


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    """The synthetic nested structures written as regions (whole = every structure, inner), planned, fold 0 trained
    and validated again with --npz (nnU-Net's own probabilities of the same weights)."""
    nn = NnUNet(tmp_path_factory.mktemp("regions"))
    folder = make_synthetic_dataset(nn.raw, dataset_id=507, name="Regions", num_cases=8, shape=(24, 32, 32), seed=5)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, **{name: list(labels) for name, labels in REGIONS.items()}}
    dataset_json["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    nn.plan(507, "3d_fullres")
    proc = nn.train(507, "3d_fullres", TRAINER, "0")
    nn.train(507, "3d_fullres", TRAINER, "0", "--val", "--npz")
    fold = nn.results / folder.name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    return nn, folder.name, fold, proc.stdout


def binary_ece(p: np.ndarray, y: np.ndarray) -> float:
    """Binary ECE with 15 equal-width bins, a loop over bins."""
    index = np.minimum((p * 15).astype(int), 14)
    return sum(abs(p[index == b].sum() - y[index == b].sum()) for b in range(15)) / p.size


def test_the_route_is_region_based_and_trains_with_the_sigmoid_mbls(regions):
    nn, dataset, fold, stdout = regions
    assert json.loads((nn.preprocessed / dataset / "dataset.json").read_text())["regions_class_order"] == [1, 2]
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "nnunet-mbls loss: RegionMbLSLoss (mbls) {'margin': 10.0, 'lam': 0.1}" in log
    assert "nnunet-mbls calibration (regions): whole: T = " in log


def test_per_region_temperatures_are_folded_into_the_head(regions):
    from nnunet_mbls.calibration.folds import calibration_problem

    _, _, fold, _ = regions
    record = json.loads((fold / "calibration.json").read_text())
    assert list(record["region_temperatures"]) == list(REGIONS)
    assert record["source_checkpoint"] == {"file": "checkpoint_final.pth", "sha256": sha256(fold / "checkpoint_final.pth")}
    trained, calibrated = weights_of(fold / "checkpoint_final.pth"), weights_of(fold / record["calibrated_checkpoint"])
    head = head_key(trained)
    T = np.array(list(record["region_temperatures"].values()))
    np.testing.assert_allclose(calibrated[head].numpy() * T.reshape(-1, 1, 1, 1, 1), trained[head].numpy(), rtol=1e-5)
    np.testing.assert_allclose(calibrated[head.replace("weight", "bias")].numpy() * T, trained[head.replace("weight", "bias")].numpy(), rtol=1e-5)
    assert calibration_problem(fold) is None


def test_streamed_metrics_equal_those_of_nnunet_exported_probabilities(regions):
    nn, dataset, fold, _ = regions
    record = json.loads((fold / "calibration.json").read_text())
    probabilities, targets = {name: [] for name in REGIONS}, {name: [] for name in REGIONS}
    cases = sorted(p.name[: -len(".npz")] for p in (fold / "validation").glob("*.npz"))
    assert len(cases) == 2
    for case in cases:
        p = np.load(fold / "validation" / f"{case}.npz")["probabilities"]
        properties = pickle.loads((fold / "validation" / f"{case}.pkl").read_bytes())
        inside = tuple(slice(a, b) for a, b in properties["bbox_used_for_cropping"])  # identity transpose here
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(nn.preprocessed / dataset / "gt_segmentations" / f"{case}.nii.gz")))
        for r, (name, labels) in enumerate(REGIONS.items()):
            probabilities[name].append(p[r][inside].ravel())
            targets[name].append(np.isin(ref[inside], labels).ravel())
    for name in REGIONS:
        p, y = np.concatenate(probabilities[name]).astype(np.float64), np.concatenate(targets[name])
        before = record["before"]["regions"][name]
        assert before["n_voxels"] == p.size
        assert before["ece"] == pytest.approx(binary_ece(p, y), abs=1e-5)
        nll = -np.mean(np.where(y, np.log(np.clip(p, 1e-12, 1)), np.log(np.clip(1 - p, 1e-12, 1))))
        assert before["nll"] == pytest.approx(nll, rel=1e-3)


def test_calibrated_probabilities_are_sigmoid_of_logit_over_T_and_refusals_name_nnunet(regions, tmp_path):
    nn, dataset, fold, _ = regions
    T = np.array(list(json.loads((fold / "calibration.json").read_text())["region_temperatures"].values()))
    case = "case_0000"
    inputs, image = tmp_path / "in", nn.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz"
    out = {k: v.astype(np.float64) for k, v in nn.predict_probabilities(
        507, dataset, case, "3d_fullres", TRAINER, ("checkpoint_final.pth", "checkpoint_final_calibrated.pth"), tmp_path).items()}
    p = np.clip(out["checkpoint_final.pth"], 1e-7, 1 - 1e-7)
    expected = 1 / (1 + np.exp(-np.log(p / (1 - p)) / T.reshape(-1, 1, 1, 1)))
    weight = sliding_window_weight(nn.preprocessed / dataset / "nnUNetPlans.json", "3d_fullres", [image])
    saturated = (out["checkpoint_final.pth"] <= 1e-7) | (out["checkpoint_final.pth"] >= 1 - 1e-7)
    assert_close_where_fp16_is_normal(np.where(saturated, expected, out["checkpoint_final_calibrated.pth"]), expected, weight)
    clear = (np.abs(out["checkpoint_final.pth"] - 0.5) > 0.01) & fp16_normal(weight)
    assert ((out["checkpoint_final.pth"] > 0.5) == (out["checkpoint_final_calibrated.pth"] > 0.5))[clear].all()

    # maps of the region model's nnUNetv2_predict output with the per-region temperatures: sigmoid(logit(p) / T_r)
    with np.errstate(divide="ignore"):
        logit = np.log(out["checkpoint_final.pth"]) - np.log1p(-out["checkpoint_final.pth"])  # +-inf at 0 and 1
    calibrated_p = 1 / (1 + np.exp(-logit / T.reshape(-1, 1, 1, 1)))
    nn.run("nnunet-mbls", "maps", "-i", str(tmp_path / "checkpoint_final.pth"), "-o", str(tmp_path / "maps"),
           "--calibration-json", str(fold / "calibration.json"))
    for r, name in enumerate(REGIONS):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "maps" / "maps" / f"{case}_prob_{name}.nii.gz")))
        assert np.abs(written - calibrated_p[r]).max() < 1e-5, name
    rows = json.loads((tmp_path / "maps" / "qc.json").read_text())["cases"][case]
    spacing = np.prod(sitk.ReadImage(str(image)).GetSpacing()) / 1000
    for r, name in enumerate(REGIONS):
        assert rows[f"volume_ml_{name}"] == pytest.approx((calibrated_p[r] > 0.5).sum() * spacing)
    q = np.clip(calibrated_p, 1e-12, 1 - 1e-12)
    h = (-(q * np.log(q) + (1 - q) * np.log(1 - q))).sum(0)
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "checkpoint_final.pth" / f"{case}.nii.gz")))
    assert rows["mean_entropy_fg"] == pytest.approx(h[segmentation != 0].mean(), rel=1e-4)

    refused = nn.run("nnunet-mbls", "predict", "-i", str(inputs), "-o", str(tmp_path / "ours"), "-d", "507", "-c",
                     "3d_fullres", "-f", "0", "-tr", TRAINER, "--calibrated", "-device", "cpu", check=False)
    assert refused.returncode == 1 and "region-based" in refused.stderr and "nnUNetv2_predict" in refused.stderr
    refused = nn.run("nnunet-mbls", "calibrate", "-d", "507", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device",
                     "cpu", check=False)
    assert refused.returncode == 1 and "region-based" in refused.stderr and "--val" in refused.stderr
