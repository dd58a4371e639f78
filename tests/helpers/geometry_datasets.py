"""Generated datasets covering the geometries nnU-Net handles, planned once per test session.

Used by the geometry matrix (integration/test_geometry_matrix.py), the prediction tests (inference/test_predict.py)
and the ensemble tests (calibration/folds/test_ensemble.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_mbls.data.synthetic import make_synthetic_dataset

from helpers.nnunet import NnUNet
from helpers.nnunet_fp16 import nonzero_box, sliding_window_weight


def rotation(degrees_z: float, degrees_x: float) -> tuple[float, ...]:
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


@dataclass(frozen=True)
class Geometry:
    name: str
    dataset_id: int
    configuration: str
    trainer: str
    transpose_forward: list[int]
    dataset: dict = field(default_factory=dict)


GEOMETRIES = [
    Geometry("thick_last", 511, "3d_fullres", "nnUNetTrainerMbLS_test", [2, 0, 1],
             dict(shape=(20, 24, 10), spacing=(1, 1, 3), channels=2, ignore_label=True, zero_margin=2,
                  origin=(12.5, -40.0, 7.0), direction=rotation(30, 20))),
    Geometry("thick_middle", 512, "3d_fullres", "nnUNetTrainerMbLS_test", [1, 0, 2],
             dict(shape=(28, 10, 28), spacing=(1, 3, 1), parcels=28, adjacent_absent_every=2, touch_border=True)),
    Geometry("flat_2d", 513, "2d", "nnUNetTrainerMbLSDice_test", [0, 1, 2],
             dict(shape=(40, 40), channels=2, ignore_label=True, zero_margin=3, origin=(3.0, -2.0, 1.0),
                  direction=rotation(-25, 0))),
]
#: fold 0's validation cases, fixed by our own splits_final.json: case_0001 lacks the adjacent structure
#: in thick_middle (adjacent_absent_every=2), so every dataset validates one case with and one without
VALIDATION = ["case_0000", "case_0001"]
#: fold 1's validation cases (the prediction tests ensemble folds 0 and 1)
VALIDATION_FOLD_1 = ["case_0002", "case_0003"]
NUM_CASES = 6


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read(path))


@dataclass
class Planned:
    geometry: Geometry
    nn: NnUNet
    dataset: str  # DatasetXXX_Name

    @property
    def raw(self) -> Path:
        return self.nn.raw / self.dataset

    @property
    def gt(self) -> Path:
        return self.nn.preprocessed / self.dataset / "gt_segmentations"

    @property
    def labels(self) -> dict[str, int]:
        return json.loads((self.raw / "dataset.json").read_text())["labels"]

    def fold(self, trainer: str) -> Path:
        return self.nn.fold_folder(self.dataset, trainer, self.geometry.configuration)

    def images(self, case: str) -> list[Path]:
        return sorted((self.raw / "imagesTr").glob(f"{case}_*.nii.gz"))

    def independent_crop_box(self, case: str) -> list[list[int]]:
        return nonzero_box(self.images(case))

    def crop_box_voxels(self, case: str) -> int:
        """Voxels of region "all": inside the crop box, ignore label excluded."""
        ref = array(self.raw / "labelsTr" / f"{case}.nii.gz")
        inside = ref[tuple(slice(a, b) for a, b in self.independent_crop_box(case))]
        ignore = self.labels.get("ignore")
        return int(inside.size - (np.count_nonzero(inside == ignore) if ignore is not None else 0))

    def foreground_voxels(self, case: str) -> int:
        ref = array(self.raw / "labelsTr" / f"{case}.nii.gz")
        ignore = self.labels.get("ignore", -1)
        return int(np.count_nonzero((ref != 0) & (ref != ignore)))

    def sliding_window_weight(self, case: str) -> np.ndarray:
        """nnU-Net's fp16 Gaussian weight sum per voxel of ``case`` (see nnunet_fp16)."""
        return sliding_window_weight(self.nn.preprocessed / self.dataset / "nnUNetPlans.json",
                                     self.geometry.configuration, self.images(case))

    def inputs(self, folder: Path, cases: list[str]) -> Path:
        """``folder`` with links to the raw images of ``cases`` (nnU-Net's input naming)."""
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            for image in (self.raw / "imagesTr").glob(f"{case}_*.nii.gz"):
                if not (folder / image.name).exists():
                    (folder / image.name).symlink_to(image)
        return folder

    def predict(self, trainer: str, out: Path, checkpoint: str = "checkpoint_final.pth", folds=("0",),
                cases=VALIDATION, probabilities: bool = True) -> Path:
        """``nnUNetv2_predict`` of ``cases`` with ``folds`` and ``checkpoint`` into ``out``."""
        inputs = self.inputs(out.parent / f"{out.name}_input", cases)
        self.nn.run("nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(self.geometry.dataset_id),
                    "-c", self.geometry.configuration, "-f", *folds, "-tr", trainer, "-chk", checkpoint,
                    *(["--save_probabilities"] if probabilities else []), "-device", "cpu", "-npp", "0", "-nps", "0")
        return out

    def train(self, trainer: str, fold: str = "0", *extra: str) -> Path:
        """Train ``trainer`` on ``fold`` unless a finished run (calibrated, for our trainers) is there; with
        ``--npz``, a finished run whose validation .npz were deleted (trained without it by another test)
        reruns nnU-Net's validation, and with it our calibration step (``--val --npz``)."""
        folder = self.nn.fold_folder(self.dataset, trainer, self.geometry.configuration, int(fold))
        if not (folder / "checkpoint_final.pth").is_file():
            self.nn.train(self.geometry.dataset_id, self.geometry.configuration, trainer, fold, *extra)
        elif "--npz" in extra and not any((folder / "validation").glob("*.npz")):
            self.nn.train(self.geometry.dataset_id, self.geometry.configuration, trainer, fold, *extra, "--val")
        return folder


_PLANNED: dict[str, Planned] = {}


def planned(geometry: Geometry, tmp_path_factory) -> Planned:
    """Generate, plan and preprocess one geometry (once per test session); folds 0 and 1 as fixed above."""
    if geometry.name not in _PLANNED:
        nn = NnUNet(tmp_path_factory.mktemp(geometry.name))
        folder = make_synthetic_dataset(nn.raw, dataset_id=geometry.dataset_id, name=geometry.name.title().replace("_", ""),
                                        num_cases=NUM_CASES, seed=geometry.dataset_id, **geometry.dataset)
        nn.plan(geometry.dataset_id, geometry.configuration)
        cases = [f"case_{i:04d}" for i in range(NUM_CASES)]
        splits = [{"train": [c for c in cases if c not in val], "val": val} for val in (VALIDATION, VALIDATION_FOLD_1)]
        (nn.preprocessed / folder.name / "splits_final.json").write_text(json.dumps(splits))
        _PLANNED[geometry.name] = Planned(geometry, nn, folder.name)
    return _PLANNED[geometry.name]
