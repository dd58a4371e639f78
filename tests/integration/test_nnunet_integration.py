"""Real nnU-Net commands (plan, train, predict) with our trainers found through nnUNet_extTrainer, on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_mbls.data.synthetic import make_synthetic_dataset

from helpers.nnunet import NnUNet
from helpers.nnunet_fp16 import assert_close_where_fp16_is_normal, fp16_normal, sliding_window_weight

pytestmark = pytest.mark.integration  # every test plans/trains/predicts with nnU-Net (directly or via nnunet_3d)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def training_log(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("training_log_*.txt")))


def test_mbls_trainer_trains_validates_calibrates_and_predicts_3d(nnunet_3d, tmp_path):
    nn, dataset = nnunet_3d
    fold = nn.fold_folder(dataset, "nnUNetTrainerMbLS_test", "3d_fullres")
    earlier_logs = set(fold.glob("training_log_*.txt"))  # the benchmark tests may have trained this fold already
    # validation/ is watched during the whole run: no .npz/.pkl appears there at any time (statistics are streamed);
    # those another test's `--val --npz` of this fold left are removed first
    for leftover in [*fold.glob("validation/*.npz"), *fold.glob("validation/*.pkl")]:
        leftover.unlink()
    _, seen, polls = nn.train_watching(501, "3d_fullres", "nnUNetTrainerMbLS_test", "0", fold / "validation")
    assert polls > 10 and not seen, seen
    new_logs = sorted(set(fold.glob("training_log_*.txt")) - earlier_logs)
    assert len(new_logs) == 1
    log = new_logs[0].read_text()
    assert "nnunet-mbls loss: MbLSLoss (mbls) {'margin': 10.0, 'lam': 0.1}" in log
    assert log.count("Foreground ECE (validation batches)") == 2  # one per epoch
    # nnU-Net's final validation ran (segmentations + summary) and our step wrote its own files beside it
    assert len(list((fold / "validation").glob("*.nii.gz"))) == 2
    # trained without --npz: no probability file; the calibration step read the statistics streamed out of the export
    assert not list((fold / "validation").glob("*.npz")) and not list((fold / "validation").glob("*.pkl"))
    validated = sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz"))
    assert sorted(p.name for p in (fold / "validation_statistics").iterdir()) == [f"{c}.npz" for c in validated]
    assert all(p.stat().st_size < 5e6 for p in (fold / "validation_statistics").iterdir())
    assert (fold / "validation" / "summary.json").is_file()
    calibration = json.loads((fold / "calibration.json").read_text())
    assert 0.05 <= calibration["temperature"] <= 20
    assert calibration["statistics"]["source"].startswith("statistics streamed")
    assert calibration["calibrated_checkpoint"] == "checkpoint_final_calibrated.pth"
    assert (fold / "calibration" / "reliability.png").stat().st_size > 1000
    assert (fold / "progress_calibration.png").is_file()
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["logging"]["val_fg_ece"]) == 2
    assert checkpoint["trainer_name"] == "nnUNetTrainerMbLS_test"

    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in ("case_0000", "case_0001"):
        (inputs / f"{case}_0000.nii.gz").symlink_to(nn.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz")
    out = tmp_path / "out"
    nn.run("nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", "501", "-c", "3d_fullres", "-f", "0",
           "-tr", "nnUNetTrainerMbLS_test", "-device", "cpu", "-npp", "0", "-nps", "0")
    for case in ("case_0000", "case_0001"):
        seg = read_labels(out / f"{case}.nii.gz")
        assert seg.shape == read_labels(nn.raw / dataset / "labelsTr" / f"{case}.nii.gz").shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3}


def test_2d_configuration_with_mbls_dice(tmp_path_factory):
    nn = NnUNet(tmp_path_factory.mktemp("nnunet2d"))
    folder = make_synthetic_dataset(nn.raw, dataset_id=502, name="Tiny2D", num_cases=8, shape=(48, 48), seed=1)
    nn.plan(502, "2d")
    nn.train(502, "2d", "nnUNetTrainerMbLSDice_test")
    fold = nn.fold_folder(folder.name, "nnUNetTrainerMbLSDice_test", "2d")
    assert "MbLSDiceLoss (mbls_dice) {'margin': 10.0, 'lam': 0.1}" in training_log(fold)
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "calibration.json").is_file()
    out = nn.root / "pred2d"
    nn.run("nnUNetv2_predict", "-i", str(nn.raw / folder.name / "imagesTr"), "-o", str(out), "-d", "502", "-c", "2d",
           "-f", "0", "-tr", "nnUNetTrainerMbLSDice_test", "-device", "cpu", "-npp", "0", "-nps", "0")
    assert len(list(out.glob("*.nii.gz"))) == 8
    assert_conformal_curves_count_every_voxel(nn, folder.name, "2d", "502", "nnUNetTrainerMbLSDice_test", None)


def assert_conformal_curves_count_every_voxel(nn, dataset: str, configuration: str, dataset_id: str, trainer: str,
                                              ignore: int | None) -> None:
    """``nnunet-mbls conformal`` on the fold's out-of-fold cases: each case's histograms count every voxel of the image
    (nnU-Net's crop box and outside it) but the ignored ones, and each label's reference voxels, as the label file."""
    from nnunet_mbls.calibration.conformal.curves import CaseCurves

    nn.run("nnunet-mbls", "conformal", "-d", dataset_id, "-c", configuration, "-f", "0", "-tr", trainer, "--as-trained",
           "-device", "cpu", "--alpha", "0.5", "--no-acceptance")
    fold = nn.fold_folder(dataset, trainer, configuration)
    record = json.loads((fold.parent / "conformal.json").read_text())
    files = sorted((fold / "conformal_curves").glob("*.npz"))
    assert [f.stem for f in files] == record["cases"] and len(files) >= 1
    for file in files:
        curves = CaseCurves.load(file)
        gt = read_labels(nn.preprocessed / dataset / "gt_segmentations" / f"{file.stem}.nii.gz")
        counted = gt != ignore if ignore is not None else np.ones(gt.shape, bool)
        assert (curves.counts.sum(axis=1) == counted.sum()).all()
        assert curves.reference_counts.sum(axis=1).tolist() == [int((gt == label).sum()) for label in curves.labels]


def test_dataset_with_ignore_label_trains_and_ignored_voxels_are_not_scored(tmp_path_factory):
    nn = NnUNet(tmp_path_factory.mktemp("nnunet_ignore"))
    folder = make_synthetic_dataset(nn.raw, dataset_id=503, name="TinyIgnore", num_cases=6, shape=(24, 32, 32),
                                    seed=2, ignore_label=True)
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert labels["ignore"] == 4
    nn.plan(503, "3d_fullres")
    nn.train(503, "3d_fullres", "nnUNetTrainerCE_test")
    fold = nn.fold_folder(folder.name, "nnUNetTrainerCE_test", "3d_fullres")
    assert "ignore_label=4" in training_log(fold)
    before = json.loads((fold / "calibration" / "evaluation_before.json").read_text())
    for case, metrics in before["per_case"].items():
        gt = read_labels(nn.preprocessed / folder.name / "gt_segmentations" / f"{case}.nii.gz")
        assert (gt == 4).any(), "the test needs ignored voxels in the validation cases"
        assert metrics["n_voxels"] == int(((gt != 0) & (gt != 4)).sum())
    assert_conformal_curves_count_every_voxel(nn, folder.name, "3d_fullres", "503", "nnUNetTrainerCE_test", 4)


def test_region_based_dataset_is_refused_by_a_loss_without_sigmoid_form(nnunet_3d, monkeypatch):
    from nnunet_mbls.trainers import nnUNetTrainerSVLS
    from nnunet_mbls.trainers.base import RegionBasedDatasetError

    nn, dataset = nnunet_3d
    nn.apply_env(monkeypatch)
    plans = dict(json.loads((nn.preprocessed / dataset / "nnUNetPlans.json").read_text()), continue_training=False)
    dataset_json = json.loads((nn.preprocessed / dataset / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "whole": [1, 2, 3], "inner": 2}
    dataset_json["regions_class_order"] = [1, 2]
    with pytest.raises(RegionBasedDatasetError, match="no sigmoid form.*nnUNetTrainerMbLS.*stock nnUNetTrainer"):
        nnUNetTrainerSVLS(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))


def test_deep_supervision_weights_equal_stock_nnunet(nnunet_3d, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_mbls.losses import MbLSLoss
    from nnunet_mbls.trainers import nnUNetTrainerMbLS

    nn, dataset = nnunet_3d
    nn.apply_env(monkeypatch)
    plans = dict(json.loads((nn.preprocessed / dataset / "nnUNetPlans.json").read_text()), continue_training=False)
    dataset_json = json.loads((nn.preprocessed / dataset / "dataset.json").read_text())
    ours = nnUNetTrainerMbLS(dict(plans), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    stock = nnUNetTrainer(dict(plans), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    ours_loss, stock_loss = ours._build_loss(), stock._build_loss()
    assert isinstance(ours_loss.loss, MbLSLoss)
    assert len(ours_loss.weight_factors) == len(stock_loss.weight_factors) >= 2
    np.testing.assert_allclose(ours_loss.weight_factors, stock_loss.weight_factors)


def test_evaluate_on_a_stock_nnunet_validation_folder(trained_stock_3d, tmp_path):
    nn, dataset, fold = trained_stock_3d
    gt = nn.preprocessed / dataset / "gt_segmentations"
    out = tmp_path / "metrics.json"
    nn.run("nnunet-mbls", "evaluate", "-ref", str(gt), "-pred", str(fold / "validation"), "-o", str(out), "--chill")
    result = json.loads(out.read_text())
    assert set(result["per_case"]) == {p.name[:-4] for p in (fold / "validation").glob("*.npz")}
    assert {"ece", "cece", "nll", "brier", "dice", "hd95"} <= set(result["mean"])
    assert out.with_suffix(".png").is_file()
    # Dice equals nnU-Net's own evaluation of the same validation run
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    for case_entry in summary["metric_per_case"]:
        case = Path(case_entry["reference_file"]).name[: -len(".nii.gz")]
        for label, name in ((1, "outer"), (2, "inner"), (3, "adjacent")):
            ours, theirs = result["per_case"][case]["dice"][name], case_entry["metrics"][str(label)]["Dice"]
            assert ours == pytest.approx(theirs, abs=1e-6, nan_ok=True)
    # foreground ECE of each case against a plain numpy computation
    for case, metrics in result["per_case"].items():
        probs = np.load(fold / "validation" / f"{case}.npz")["probabilities"]
        ref = read_labels(gt / f"{case}.nii.gz")
        fg = ref != 0
        p, y = probs[:, fg], ref[fg]
        conf, correct = p.max(0), p.argmax(0) == y
        bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
        ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).sum()
                  for b in range(15) if (bins == b).any()) / fg.sum()
        assert metrics["ece"] == pytest.approx(ece, abs=1e-6)
        assert metrics["nll"] == pytest.approx(-np.log(np.maximum(p[y, np.arange(y.size)], 1e-12)).mean(), rel=1e-5)


def test_calibrate_stock_model_and_predict_with_the_folded_checkpoint(trained_stock_3d, tmp_path):
    nn, dataset, fold = trained_stock_3d
    original = sha256(fold / "checkpoint_final.pth")
    nn.run("nnunet-mbls", "calibrate", "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test",
           "-device", "cpu")
    calibration = json.loads((fold / "calibration.json").read_text())
    T = calibration["temperature"]
    assert sha256(fold / "checkpoint_final.pth") == original
    assert {"before", "after"} <= set(calibration) and calibration["fit"]["subsample_size"] > 0
    # the temperature fit lowers NLL on the voxels it was fitted on (all voxels in the crop box)
    assert T != pytest.approx(1.0, abs=1e-3)

    inputs = tmp_path / "in"
    inputs.mkdir()
    case = sorted(p.name[:-4] for p in (fold / "validation").glob("*.npz"))[0]
    (inputs / f"{case}_0000.nii.gz").symlink_to(nn.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz")
    results = {}
    for checkpoint in ("checkpoint_final.pth", "checkpoint_final_calibrated.pth"):
        out = tmp_path / checkpoint
        nn.run("nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", "501", "-c", "3d_fullres", "-f", "0",
               "-tr", "nnUNetTrainerStock_test", "-chk", checkpoint, "--save_probabilities", "-device", "cpu",
               "-npp", "0", "-nps", "0")
        results[checkpoint] = (read_labels(out / f"{case}.nii.gz"), np.load(out / f"{case}.npz")["probabilities"])
    seg, probs = results["checkpoint_final.pth"]
    seg_t, probs_t = results["checkpoint_final_calibrated.pth"]
    expected = probs ** (1 / T)
    expected /= expected.sum(0, keepdims=True)
    weight = sliding_window_weight(nn.preprocessed / dataset / "nnUNetPlans.json", "3d_fullres", [inputs / f"{case}_0000.nii.gz"])
    assert_close_where_fp16_is_normal(probs_t, expected, weight)
    assert np.mean(np.abs(probs_t - expected) > 0.02) < 0.05
    # argmax is unchanged where nnU-Net's logits keep fp16 precision and fp16 rounding cannot have flipped a near
    # tie; where the weights are subnormal the distorted probabilities can tie (seen: 0.5% of a 24x32x32 image)
    top2 = np.sort(probs, axis=0)[-2:]
    clear = ((top2[1] - top2[0]) > 0.01) & fp16_normal(weight)
    assert clear.mean() > 0.5
    assert (seg_t[clear] == seg[clear]).all()
    assert np.mean(seg_t == seg) > 0.98

    # rerunning is idempotent and still leaves the original checkpoint alone
    def folded_weights() -> dict:
        return torch.load(fold / "checkpoint_final_calibrated.pth", map_location="cpu", weights_only=False)

    before = folded_weights()
    nn.run("nnunet-mbls", "calibrate", "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test",
           "-device", "cpu")
    assert json.loads((fold / "calibration.json").read_text())["temperature"] == T
    assert sha256(fold / "checkpoint_final.pth") == original
    after = folded_weights()
    assert after["mbls_temperature"] == pytest.approx(T)
    assert after["network_weights"].keys() == before["network_weights"].keys()
    assert all(torch.equal(after["network_weights"][k], before["network_weights"][k]) for k in before["network_weights"])


def test_calibrate_without_a_trained_model_says_what_to_run(nnunet_3d):
    nn, _ = nnunet_3d
    proc = nn.run("nnunet-mbls", "calibrate", "-d", "501", "-c", "3d_fullres", "-f", "1", "-tr", "nnUNetTrainerMbLS",
                  "-device", "cpu", check=False)
    assert proc.returncode != 0
    assert "nnUNetv2_train 501 3d_fullres 1 -tr nnUNetTrainerMbLS" in proc.stderr
