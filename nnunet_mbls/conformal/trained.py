"""``nnunet-mbls conformal -d -c -f -tr -p``: the rules fitted on trained folds.

Two sources of labelled cases, as for ``calibrate``:

- the folds' out-of-fold validation cases (each predicted by the fold that did not train on it): nnU-Net's own
  validation runs again (``checkpoint_final.pth``), and each case's :class:`CaseCurves` are computed inside its
  export worker while the logits are in memory (``<fold>/conformal_curves/``; no probability file). The deployed
  ensemble averages the folds, so these cases stand in for its outputs: a single fold is usually a little worse
  than the ensemble, which makes the guarantees slightly conservative, not exact (recorded);
- ``--calibration-set IMAGES LABELS``: the listed folds' ensemble predicts held-out labelled cases with nnU-Net's
  predictor (TTA as deployed), the curves streamed out of its export: the exact route.

When the folds are calibrated, the probabilities are those after their temperature (the one folded into their
calibrated checkpoints); ``as_trained`` uses them as trained. ``conformal.json`` records which.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..calibration.conformal.curves import GRID, CaseCurves, case_curves
from ..calibration.conformal.risk import ConformalError
from ..calibration.evaluation.export import PREDICTOR_MODULE, StatisticsExport, streaming_validation_export
from ..calibration.files import read_calibration_temperature
from ..inference.qc import DEFAULT_BOUNDARY_WIDTH, case_scores, voxel_volume_ml
from ..io import partial_folder
from ..layout import CHECKPOINT_FINAL, FoldFolder
from ..locks import fold_locks
from .record import AcceptanceSettings, fit_and_write, labels_to_calibrate

#: the folder of a fold holding its validation cases' curves
CURVES_FOLDER = "conformal_curves"


@dataclass(frozen=True)
class CurvesSettings:
    """What the export workers compute the curves with (picklable)."""

    num_classes: int
    ignore_label: int | None
    temperature: float
    grid: int = GRID


@dataclass(frozen=True)
class CurvesExport(StatisticsExport):
    """The export job whose per-case output is the case's :class:`CaseCurves` (``settings``: :class:`CurvesSettings`)."""

    def statistics_of(self, case: str, logits, ref: np.ndarray, properties: dict, transpose_forward,
                      segmentation: np.ndarray) -> CaseCurves:
        """The case's curves and QC scores from the probabilities put back into the image (as nnU-Net's
        ``--save_probabilities`` export would write them)."""
        s = self.settings
        probabilities = probabilities_in_image(logits, properties, transpose_forward, s.temperature)
        foreground = list(range(1, s.num_classes))
        spacing = properties["spacing"]
        scores = case_scores(segmentation, probabilities, spacing, {k: str(k) for k in foreground},
                             DEFAULT_BOUNDARY_WIDTH)
        scores = {k: v for k, v in scores.items() if not k.startswith("volume_ml_")}
        return case_curves(case, probabilities, ref.astype(np.int64), foreground, voxel_volume_ml(spacing),
                           s.ignore_label, scores, s.grid)


def probabilities_in_image(logits, properties: dict, transpose_forward: Sequence[int], temperature: float) -> np.ndarray:
    """(C, *image) softmax(logits / T) in the original frame: background probability 1 outside nnU-Net's crop box,
    axes transposed back (what ``convert_predicted_logits_to_segmentation_with_correct_shape`` returns)."""
    cropped = torch.softmax(torch.as_tensor(logits).float() / temperature, 0).numpy()
    full = np.zeros((cropped.shape[0], *[int(s) for s in properties["shape_before_cropping"]]), dtype=np.float32)
    full[0] = 1.0
    full[(slice(None), *[slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"]])] = cropped
    backward = np.argsort([int(a) for a in transpose_forward])
    return full.transpose([0, *(int(a) + 1 for a in backward)])


def fold_temperature(fold: FoldFolder, as_trained: bool) -> tuple[float, str]:
    """The temperature the deployed fold applies (the one its calibrated checkpoint holds) and a description."""
    if as_trained or not fold.calibration_record.is_file():
        return 1.0, "as trained"
    record = json.loads(fold.calibration_record.read_text())
    if record.get("checkpoint_temperature") is None and record.get("method", {}).get("chosen") == "vector":
        raise ConformalError(f"{fold.path} is calibrated by vector scaling; conformal calibration applies temperatures "
                             f"only: pass --as-trained, or redo the temperature with {fold.calibrate_command()}")
    t = read_calibration_temperature(fold.calibration_record, "checkpoint_temperature", "temperature",
                                     f"{fold.path.name}'s calibration record")
    return t, f"after temperature T = {t:g} ({fold.calibration_record.name})"


def conformal_on_folds(dataset: str, configuration: str, folds: Sequence[str], trainer: str, plans: str,
                       output_file: str | os.PathLike | None, risks: Sequence[str], alpha: float,
                       labels: Sequence[str] | None = None, acceptance: AcceptanceSettings | None = None,
                       device: str = "cuda", calibration_set: Sequence[str] | None = None, step_size: float = 0.5,
                       disable_tta: bool = False, as_trained: bool = False) -> dict:
    """Fit ``conformal.json`` (default: in the trainer folder) on trained folds (module docstring)."""
    fold_folders = [FoldFolder.of(dataset, configuration, f, trainer, plans) for f in folds]
    for fold in fold_folders:
        if not fold.checkpoint_final.is_file():
            raise ConformalError(f"{fold.checkpoint_final} does not exist: train first with {fold.train_command()}")
    model_folder = fold_folders[0].path.parent
    output_file = Path(output_file) if output_file else model_folder / "conformal.json"
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    if any(not isinstance(v, int) for v in dataset_json["labels"].values()):
        raise ConformalError(f"{model_folder.name} is region-based; conformal masks are for softmax models")
    names = labels_to_calibrate(dataset_json["labels"], labels)
    num_classes = len([k for k in dataset_json["labels"] if k != "ignore"])
    temperatures = [fold_temperature(f, as_trained) for f in fold_folders]
    if len({t for t, _ in temperatures}) > 1 and calibration_set:
        raise ConformalError(f"the folds hold different temperatures {[t for t, _ in temperatures]}; the ensemble needs "
                             f"one: calibrate them together ({fold_folders[0].calibrate_command(' '.join(folds))}) or "
                             f"pass --as-trained")
    ignore = dataset_json["labels"].get("ignore")
    with fold_locks([f.path for f in fold_folders]):
        if calibration_set:
            curves = _calibration_set_curves(model_folder, folds, calibration_set, dataset_json, num_classes, ignore,
                                             temperatures[0][0], device, step_size, disable_tta)
        else:
            curves = out_of_fold_curves(dataset, configuration, trainer, plans, fold_folders, temperatures,
                                         num_classes, ignore, device)
    source = {"route": "calibration set" if calibration_set else "out-of-fold validation", "model": str(model_folder),
              "folds": [str(f) for f in folds], "checkpoint": CHECKPOINT_FINAL,
              "probabilities": sorted({d for _, d in temperatures}),
              "temperatures": [t for t, _ in temperatures]}
    if calibration_set:
        source.update(images=str(Path(calibration_set[0]).resolve()), labels=str(Path(calibration_set[1]).resolve()),
                      tta=not disable_tta, step_size=step_size)
    else:
        source["note"] = ("each case is predicted by the one fold that did not train on it, not by the ensemble of "
                          "the folds: the guarantees transfer to the ensemble only as far as its outputs resemble a "
                          "single fold's (use --calibration-set for the exact route)")
    return fit_and_write(curves, names, risks, alpha, acceptance, num_classes, source, output_file)


def out_of_fold_curves(dataset, configuration, trainer, plans, fold_folders, temperatures, num_classes, ignore,
                        device) -> list[CaseCurves]:
    from ..calibration.folds.step import gt_folder_for
    from ..calibration.folds.validation import run_streamed_validation
    from ..calibration.evaluation.export import weights_id

    curves = []
    for fold, (t, _) in zip(fold_folders, temperatures):
        folder = fold.path / CURVES_FOLDER
        for old in folder.glob("*.npz") if folder.is_dir() else []:
            old.unlink()

        def job_of(instance, folder=folder, t=t):
            return CurvesExport(CurvesSettings(num_classes, ignore, t), str(gt_folder_for(fold.path)), str(folder),
                                weights_id(instance.network))

        run_streamed_validation(dataset, configuration, fold.path.name.replace("fold_", ""), trainer, plans, device,
                                job_of=job_of)
        curves += [CaseCurves.load(p) for p in sorted(folder.glob("*.npz"))]
    return curves


def _calibration_set_curves(model_folder: Path, folds, calibration_set, dataset_json, num_classes, ignore, temperature,
                            device, step_size, disable_tta) -> list[CaseCurves]:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from ..calibration.folds.ensemble import calibration_set_cases, refuse_cascade_stage

    images, labels = Path(calibration_set[0]), Path(calibration_set[1])
    for name, folder in (("IMAGES", images), ("LABELS", labels)):
        if not folder.is_dir():
            raise ConformalError(f"--calibration-set {name} {folder} is not a folder; pass the held-out images (nnU-Net "
                                 f"naming, CASE_0000{dataset_json['file_ending']}) and their reference segmentations")
    calibration_set_cases(images, labels, dataset_json["file_ending"])
    with partial_folder(model_folder) as tmp:
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                    perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=True)
        predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in folds],
                                                       CHECKPOINT_FINAL)
        refuse_cascade_stage(predictor, model_folder.name.split("__")[-1], "conformal")
        job = CurvesExport(CurvesSettings(num_classes, ignore, temperature), str(labels), str(Path(tmp) / "curves"),
                           "calibration set")
        with streaming_validation_export(job, PREDICTOR_MODULE):
            predictor.predict_from_files_sequential(str(images), str(tmp), save_probabilities=False, overwrite=True)
        return [CaseCurves.load(p) for p in sorted(Path(job.output_folder).glob("*.npz"))]
