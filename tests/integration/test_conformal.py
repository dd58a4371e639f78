"""``nnunet-mbls conformal`` on a real nnU-Net fold: thresholds against a naive computation from nnU-Net's own
probability files, the streamed (out-of-fold) route against the file route, and the masks, intervals and flags
that ``predict``/``maps --conformal-json`` write, in the input geometry."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from helpers.cli import one_error_line
from nnunet_mbls.calibration.conformal.curves import GRID, threshold_of

pytestmark = pytest.mark.integration
LABELS = {"outer": 1, "inner": 2, "adjacent": 3}
ALPHA = 0.5  # fold 0 validates 2 cases: alpha 0.5 needs n >= 1 (FNR, FDR) and ceil(3 * 0.5) = 2 <= n (volume)


def _naive_fnr_index(cases: list[tuple[np.ndarray, np.ndarray]], label: int, alpha: float) -> int:
    """Largest grid threshold g with n/(n+1) mean FNR + 1/(n+1) <= alpha, from the arrays, mask by mask."""
    present = [(p, r) for p, r in cases if (r == label).any()]
    n, best = len(present), 0
    for g in range(GRID + 1):
        fnr = [1 - ((p[label] >= threshold_of(g)) & (r == label)).sum() / (r == label).sum() if g < GRID else 1.0
               for p, r in present]
        if n / (n + 1) * np.mean(fnr) + 1 / (n + 1) <= alpha + 1e-12:
            best = g
    return best


@pytest.fixture(scope="module")
def folder_record(trained_stock_3d, tmp_path_factory):
    nn, dataset, fold = trained_stock_3d
    out = tmp_path_factory.mktemp("conformal") / "conformal.json"
    nn.run("nnunet-mbls", "conformal", "-ref", str(nn.preprocessed / dataset / "gt_segmentations"), "-pred",
           str(fold / "validation"), "--chill", "-o", str(out), "--alpha", str(ALPHA))
    return json.loads(out.read_text()), out


def test_folder_route_thresholds_equal_a_naive_computation_on_nnunet_files(trained_stock_3d, folder_record):
    nn, dataset, fold = trained_stock_3d
    record, _ = folder_record
    cases = []
    for npz in sorted((fold / "validation").glob("*.npz")):
        p = np.load(npz)["probabilities"]
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(nn.preprocessed / dataset / "gt_segmentations" /
                                                      f"{npz.stem}.nii.gz")))
        cases.append((p, r))
    assert record["num_cases"] == len(cases) == 2 and record["cases"] == sorted(n.stem for n in (fold / "validation").glob("*.npz"))
    for name, label in LABELS.items():
        assert record["labels"][name]["fnr"]["grid_index"] == _naive_fnr_index(cases, label, ALPHA), name
    assert "exchangeable" in record["assumption"] and record["alpha"] == ALPHA
    assert record["acceptance"]["threshold"] is None  # 2 cases certify nothing, and the record says so
    assert "every case is flagged" in record["acceptance"]["guarantee"]


def test_out_of_fold_route_streams_the_same_curves_as_the_file_route(trained_stock_3d, folder_record, tmp_path):
    nn, dataset, fold = trained_stock_3d
    record, _ = folder_record
    out = tmp_path / "trained.json"
    nn.run("nnunet-mbls", "conformal", "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test",
           "--as-trained", "-device", "cpu", "-o", str(out), "--alpha", str(ALPHA))
    streamed = json.loads(out.read_text())
    assert streamed["source"]["route"] == "out-of-fold validation" and streamed["cases"] == record["cases"]
    for name in LABELS:
        for risk in ("fnr", "fdr"):
            assert abs(streamed["labels"][name][risk]["grid_index"] - record["labels"][name][risk]["grid_index"]) <= 1
        assert abs(streamed["labels"][name]["volume"]["grid_steps"] - record["labels"][name]["volume"]["grid_steps"]) <= 1
    assert sorted(p.stem for p in (fold / "conformal_curves").glob("*.npz")) == record["cases"]
    assert not list((fold / "conformal_curves").glob("*.nii.gz"))


def test_predict_and_maps_write_the_conformal_masks_intervals_and_flags(trained_stock_3d, folder_record, tmp_path):
    nn, dataset, fold = trained_stock_3d
    record, conformal_json = folder_record
    images = tmp_path / "images"
    images.mkdir()
    case = record["cases"][0]
    (images / f"{case}_0000.nii.gz").symlink_to(nn.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz")
    saved = tmp_path / "saved"
    nn.run("nnUNetv2_predict", "-i", str(images), "-o", str(saved), "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr",
           "nnUNetTrainerStock_test", "--save_probabilities", "-device", "cpu", "-npp", "0", "-nps", "0")
    nn.run("nnunet-mbls", "maps", "-i", str(saved), "-o", str(tmp_path / "maps_out"), "--conformal-json", str(conformal_json))
    nn.run("nnunet-mbls", "predict", "-i", str(images), "-o", str(tmp_path / "pred_out"), "-d", "501", "-c",
           "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test", "-device", "cpu", "-npp", "0",
           "--conformal-json", str(conformal_json))
    probabilities = np.load(saved / f"{case}.npz")["probabilities"]
    image = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
    for out in ("maps_out", "pred_out"):
        for name, label in LABELS.items():
            for risk in ("fnr", "fdr"):
                fit = record["labels"][name][risk]
                mask_file = tmp_path / out / "maps" / f"{case}_conformal_{risk}50_{name}.nii.gz"
                mask = sitk.ReadImage(str(mask_file))
                assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
                assert mask.GetOrigin() == image.GetOrigin() and mask.GetDirection() == image.GetDirection()
                g = fit["grid_index"]
                expected = probabilities[label] >= fit["threshold"] if g < GRID else np.zeros_like(probabilities[label], bool)
                agreement = (sitk.GetArrayFromImage(mask).astype(bool) == expected).mean()
                assert agreement == 1.0 if out == "maps_out" else agreement > 0.999, (out, name, risk, agreement)
        rows = list(csv.DictReader(open(tmp_path / out / "qc.csv")))
        assert len(rows) == 1 and rows[0]["flag"] == "1"  # no threshold certified on 2 cases: every case flagged
        spacing = np.prod(image.GetSpacing()) / 1000
        for name, label in LABELS.items():
            low, high = float(rows[0][f"volume_ml_{name}_low"]), float(rows[0][f"volume_ml_{name}_high"])
            fit = record["labels"][name]["volume"]
            if out == "maps_out":
                assert math.isclose(low, (probabilities[label] >= fit["low_volume_threshold"]).sum() * spacing, rel_tol=1e-9)
                assert math.isclose(high, (probabilities[label] >= fit["high_volume_threshold"]).sum() * spacing, rel_tol=1e-9)
            assert low <= high
        qc = json.loads((tmp_path / out / "qc.json").read_text())
        assert "no threshold of mean_entropy_fg is certified" in qc["flag_rule"]
        assert qc["settings"]["conformal_alpha"] == ALPHA


def test_bad_alpha_and_too_few_cases_are_one_error_line(trained_stock_3d, tmp_path):
    nn, dataset, fold = trained_stock_3d
    base = ("nnunet-mbls", "conformal", "-ref", str(nn.preprocessed / dataset / "gt_segmentations"), "-pred",
            str(fold / "validation"), "--chill", "-o", str(tmp_path / "c.json"))
    line = one_error_line(nn.run(*base, "--alpha", "1.5", check=False), "conformal")
    assert "--alpha 1.5 must lie strictly between 0 and 1" in line
    line = one_error_line(nn.run(*base, "--alpha", "0.1", check=False), "conformal")
    assert "at least 9 calibration cases" in line and "got 2" in line and "add labelled cases" in line
    assert not (tmp_path / "c.json").exists()


def test_calibration_set_route_equals_the_file_route_of_the_same_prediction(trained_stock_3d, tmp_path):
    nn, dataset, fold = trained_stock_3d
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for label_file in sorted((nn.raw / dataset / "labelsTr").glob("*.nii.gz"))[:2]:
        case = label_file.name[: -len(".nii.gz")]
        (images / f"{case}_0000.nii.gz").symlink_to(nn.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz")
        (labels / label_file.name).symlink_to(label_file)
    model = ("-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test")
    nn.run("nnunet-mbls", "conformal", *model, "--calibration-set", str(images), str(labels), "--as-trained",
           "-device", "cpu", "-o", str(tmp_path / "set.json"), "--alpha", str(ALPHA), "--no-acceptance")
    nn.run("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "saved"), *model, "--save_probabilities",
           "-device", "cpu", "-npp", "0", "-nps", "0")
    nn.run("nnunet-mbls", "conformal", "-ref", str(labels), "-pred", str(tmp_path / "saved"), "-o",
           str(tmp_path / "files.json"), "--alpha", str(ALPHA), "--no-acceptance")
    streamed, files = (json.loads((tmp_path / f).read_text()) for f in ("set.json", "files.json"))
    assert streamed["source"]["route"] == "calibration set" and streamed["cases"] == files["cases"]
    assert "acceptance" not in streamed
    for name in LABELS:
        for risk in ("fnr", "fdr"):
            assert abs(streamed["labels"][name][risk]["grid_index"] - files["labels"][name][risk]["grid_index"]) <= 1
        assert abs(streamed["labels"][name]["volume"]["grid_steps"] - files["labels"][name]["volume"]["grid_steps"]) <= 1
    assert not [p for p in (nn.results / dataset / "nnUNetTrainerStock_test__nnUNetPlans__3d_fullres").iterdir()
                if p.name.startswith(".")]  # the calibration set's working folder is gone


def test_benchmark_measures_the_guarantees_as_trained_and_after_t(trained_stock_3d, folder_record, tmp_path):
    nn, dataset, fold = trained_stock_3d
    record, _ = folder_record
    out = tmp_path / "bench"
    nn.run("nnunet-mbls", "benchmark", "-d", "501", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerStock_test",
           "--baseline", "nnUNetTrainerStock_test", "-device", "cpu", "-o", str(out), "--conformal", str(ALPHA))
    results = json.loads((out / dataset / "results.json").read_text())
    stages = results["conformal"]["nnUNetTrainerStock_test"]
    assert set(stages) == {"before", "after"} and stages["before"]["n_cases"] == 2
    # as trained: the same rule as the conformal command fitted on nnU-Net's .npz of the same cases
    expected = np.mean([fit["fnr"]["mean_relative_volume"] for fit in record["labels"].values()])
    assert stages["before"]["fnr_volume"]["value"] == pytest.approx(expected, rel=0.05)
    assert stages["before"]["fnr_volume"]["low"] <= stages["before"]["fnr_volume"]["high"]
    assert 0 <= stages["after"]["accepted_fraction"]["value"] <= 1
    assert "## Conformal guarantees" in (out / dataset / "results.md").read_text()
    assert "AUGRC" in (out / dataset / "results.md").read_text()
