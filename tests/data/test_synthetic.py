"""nnunet_mbls.data.synthetic: the synthetic datasets, reproducible, with the structures and labels they promise,
refusing to overwrite, and passing real nnU-Net planning (CPU)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_mbls.data.synthetic import make_synthetic_dataset

from helpers.datasets import dataset_cases


def _nnunet_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)  # 0 there crashes plan_and_preprocess
    return env


@pytest.mark.integration
def test_synthetic_3d_and_2d_pass_nnunet_plan_and_preprocess(tmp_path: Path) -> None:
    env = _nnunet_env(tmp_path)
    make_synthetic_dataset(env["nnUNet_raw"], dataset_id=990, num_cases=6, shape=(24, 24, 24))
    make_synthetic_dataset(env["nnUNet_raw"], dataset_id=993, name="MbLSSynthetic2D", num_cases=6,
                           shape=(64, 64), ignore_label=True)
    # -npfp: plan_and_preprocess starts 8 fingerprint/verify workers by default (nnUNet_def_n_proc does not
    # apply there); each spawned worker imports torch, which costs ~20 s per dataset on 2 cores
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    cmd = [str(exe) if exe.exists() else "nnUNetv2_plan_and_preprocess", "-d", "990", "993",
           "-c", "2d", "3d_fullres", "--verify_dataset_integrity", "-np", "1", "-npfp", "1", "--no_pbar"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pre = Path(env["nnUNet_preprocessed"])
    plans3d = json.loads((pre / "Dataset990_MbLSSynthetic" / "nnUNetPlans.json").read_text())
    plans2d = json.loads((pre / "Dataset993_MbLSSynthetic2D" / "nnUNetPlans.json").read_text())
    assert {"2d", "3d_fullres"} <= set(plans3d["configurations"])
    assert set(plans2d["configurations"]) == {"2d"}  # (1, H, W) NIfTI is planned as a 2-D dataset
    assert plans2d["configurations"]["2d"]["patch_size"] == [64, 64]
    for sub in ("Dataset990_MbLSSynthetic/nnUNetPlans_3d_fullres", "Dataset993_MbLSSynthetic2D/nnUNetPlans_2d"):
        assert len(list((pre / sub).glob("case_0005*"))) >= 1, sub


def test_synthetic_same_seed_identical_files_other_seed_differs(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", num_cases=3, shape=(24, 24, 24), seed=0)
    b = make_synthetic_dataset(tmp_path / "b", num_cases=3, shape=(24, 24, 24), seed=0)
    c = make_synthetic_dataset(tmp_path / "c", num_cases=3, shape=(24, 24, 24), seed=1)
    d = make_synthetic_dataset(tmp_path / "d", num_cases=2, shape=(24, 24, 24), seed=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 6
    # SimpleITK's gzip header carries no time stamp, so the files are byte-identical
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert filecmp.cmp(a / "dataset.json", b / "dataset.json", shallow=False)
    assert not any(filecmp.cmp(a / f, c / f, shallow=False) for f in files)
    # case i depends only on (seed, i): fewer cases give a prefix
    assert all(filecmp.cmp(a / f, d / f, shallow=False) for f in files if "0002" not in str(f))


def test_synthetic_2d_structures_present_and_intensities_overlap(tmp_path: Path) -> None:
    folder = make_synthetic_dataset(tmp_path, num_cases=8, shape=(64, 64))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "outer": 1, "inner": 2, "adjacent": 3}
    assert meta["channel_names"] == {"0": "MRI"} and meta["numTraining"] == 8 and meta["file_ending"] == ".nii.gz"
    img = sitk.ReadImage(str(folder / "imagesTr" / "case_0000_0000.nii.gz"))
    assert img.GetSize() == (64, 64, 1) and img.GetSpacing() == (1.0, 1.0, 1.0)
    cases = dataset_cases(folder)
    assert len(cases) == 8
    for image, labels in cases:
        assert image.shape == labels.shape == (1, 64, 64) and labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0, 1, 2, 3}
    values = {k: np.concatenate([im[lab == k] for im, lab in cases]) for k in range(4)}
    lo = {k: np.percentile(v, 5) for k, v in values.items()}
    hi = {k: np.percentile(v, 95) for k, v in values.items()}
    for a, b in [(0, 1), (0, 3), (1, 3), (1, 2)]:  # classes are not separable by intensity alone
        assert lo[a] < hi[b] and lo[b] < hi[a], (a, b, lo, hi)
    assert np.mean(values[0]) < np.mean(values[3]) < np.mean(values[1]) < np.mean(values[2])


def test_synthetic_ignore_label_is_highest(tmp_path: Path) -> None:
    folder = make_synthetic_dataset(tmp_path, num_cases=4, shape=(32, 32, 32), ignore_label=True)
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert labels["ignore"] == max(labels.values()) == 4
    seen = set().union(*(np.unique(lab).tolist() for _, lab in dataset_cases(folder)))
    assert seen == {0, 1, 2, 3, 4}


def test_refuses_to_overwrite_and_validates_arguments(tmp_path: Path) -> None:
    folder = make_synthetic_dataset(tmp_path, num_cases=3, shape=(16, 16))
    with pytest.raises(FileExistsError, match=r"Dataset990_MbLSSynthetic.*overwrite=True"):
        make_synthetic_dataset(tmp_path, num_cases=2, shape=(16, 16))
    assert len(list((folder / "imagesTr").iterdir())) == 3  # untouched
    make_synthetic_dataset(tmp_path, num_cases=2, shape=(16, 16), overwrite=True)
    assert len(list((folder / "imagesTr").iterdir())) == 2
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    with pytest.raises(FileExistsError, match="Dataset990_MbLSSynthetic"):  # same id, other name
        make_synthetic_dataset(tmp_path, name="Other", num_cases=2, shape=(16, 16), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset990_MbLSSynthetic"]  # no staging left over
    (tmp_path / "Dataset994_Empty").mkdir()
    make_synthetic_dataset(tmp_path, dataset_id=994, name="Empty", num_cases=1, shape=(16, 16))  # empty is fine
    for kwargs, arg in [({"dataset_id": 0}, "dataset_id"), ({"dataset_id": 1000}, "dataset_id"),
                        ({"num_cases": 0}, "num_cases"), ({"shape": (4, 4)}, "shape"), ({"shape": (16,)}, "shape"),
                        ({"name": "bad name"}, "name"), ({"seed": -1}, "seed"),
                        ({"spacing": (1.0,)}, "spacing"), ({"channels": 0}, "channels"), ({"parcels": 0}, "parcels"),
                        ({"zero_margin": -1}, "zero_margin"), ({"adjacent_absent_every": 1}, "adjacent_absent_every")]:
        with pytest.raises(ValueError, match=arg):
            make_synthetic_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
