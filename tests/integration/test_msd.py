"""The MSD route: a Decathlon-format task through nnU-Net's own converter, planning and the benchmark."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mbls.data.synthetic import make_synthetic_dataset

from helpers.nnunet import NnUNet


TRAINER = "nnUNetTrainerMbLS_test"


@pytest.mark.integration
def test_msd_task_converts_plans_and_benchmarks(tmp_path):
    nn = NnUNet(tmp_path / "nnunet")
    msd = tmp_path / "msd"
    nn.run("nnunet-mbls", "dataset", "synthetic", "--layout", "msd", "-o", str(msd), "--id", "21", "-n", "6",
           "--test-cases", "2", "--shape", "20", "24", "24", "--spacing", "2", "1", "1", "--channels", "2", "--seed", "3")
    task = msd / "Task21_MbLSSynthetic"
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MRI", "1": "MRI2"} and meta["tensorImageSize"] == "4D"
    assert meta["labels"] == {"0": "background", "1": "outer", "2": "inner", "3": "adjacent"}
    assert meta["numTraining"] == len(meta["training"]) == 6 and meta["numTest"] == len(meta["test"]) == 2
    first = meta["training"][0]
    assert first == {"image": "./imagesTr/mblssynthetic_001.nii.gz", "label": "./labelsTr/mblssynthetic_001.nii.gz"}
    image = nibabel.load(task / first["image"])  # nibabel: NIfTI axes (x, y, z, channel)
    assert image.shape == (24, 24, 20, 2) and tuple(image.header.get_zooms()[:3]) == (1, 1, 2)
    assert nibabel.load(task / first["label"]).shape == (24, 24, 20)
    assert sorted(p.name for p in (task / "imagesTs").iterdir()) == ["mblssynthetic_007.nii.gz", "mblssynthetic_008.nii.gz"]

    # the same cases in nnU-Net's own layout, written directly by the generator
    direct = make_synthetic_dataset(tmp_path / "direct", dataset_id=21, num_cases=8, shape=(20, 24, 24),
                                    spacing=(2, 1, 1), channels=2, seed=3)
    nn.run("nnUNetv2_convert_MSD_dataset", "-i", str(task), "-np", "1")
    converted = nn.raw / "Dataset021_MbLSSynthetic"
    labels = json.loads((converted / "dataset.json").read_text())
    assert labels["channel_names"] == {"0": "MRI", "1": "MRI2"} and labels["labels"]["adjacent"] == 3
    for index, case in ((1, "case_0000"), (7, "case_0006")):
        folder = "imagesTs" if index > 6 else "imagesTr"
        for channel in (0, 1):
            ours = sitk.ReadImage(str(converted / folder / f"mblssynthetic_{index:03d}_{channel:04d}.nii.gz"))
            reference = sitk.ReadImage(str(direct / "imagesTr" / f"{case}_{channel:04d}.nii.gz"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
            assert ours.GetSpacing() == pytest.approx(reference.GetSpacing())

    nn.plan(21, "3d_fullres")
    out = tmp_path / "bench"
    nn.run("nnunet-mbls", "benchmark", "-d", "21", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "--baseline", TRAINER,
           "--train", "-device", "cpu", "-o", str(out), training=True)
    results = json.loads((out / "Dataset021_MbLSSynthetic" / "results.json").read_text())
    splits = json.loads((nn.preprocessed / "Dataset021_MbLSSynthetic" / "splits_final.json").read_text())
    assert results["missing_cells"] == [] and results["rows"][TRAINER]["num_cases"] == len(splits[0]["val"])
    fold = nn.fold_folder("Dataset021_MbLSSynthetic", TRAINER, "3d_fullres")
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    dice = [np.nanmean([m["Dice"] for m in e["metrics"].values()]) for e in summary["metric_per_case"]]
    assert results["rows"][TRAINER]["dice_before"]["mean"] == pytest.approx(np.nanmean(dice), rel=1e-9)
