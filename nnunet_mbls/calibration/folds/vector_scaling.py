"""``nnunet-mbls calibrate --method vector``: per-class scale and bias, folded into the segmentation head.

Vector scaling must be fitted on logits (see :mod:`nnunet_mbls.calibration.vector`), which nnU-Net's saved
probabilities do not keep, so this runs one more inference pass over the validation cases, exactly as
nnU-Net's validation does (its ``nnUNetPredictor`` on the preprocessed case, mirroring TTA, step 0.5), with
each fold's own network (out-of-fold, as the validation). The logits of each case are kept on disk as
float16 (in a temporary folder inside the trainer folder) until the transformed ones have been exported.

The fit uses the network grid (nnU-Net's preprocessed segmentation as the target, ignore label excluded):
a seeded uniform sample of at most ``max_voxels / number of cases`` voxels per case. Vector scaling is kept
only if its cross-validated NLL over cases beats temperature scaling's; otherwise the ordinary temperature
calibration runs, and calibration.json records the comparison either way. The metrics after vector
scaling come from nnU-Net's own export of the transformed logits, evaluated like the validation files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ... import __version__
from ...defaults import FIT_REGION, MAX_VOXELS, METRIC_REGION, SEED
from ..case_statistics import StatisticsSettings
from ..evaluation import LabelInfo, evaluate_folder
from ..evaluation.export import StatisticsExport, export_with_statistics
from ...io import atomic_write_json, partial_folder
from ...layout import CALIBRATED_CHECKPOINT, CHECKPOINT_FINAL, ENSEMBLE_DETAILS, ENSEMBLE_RECORD, FoldFolder, fold_name
from ...locks import fold_locks
from ..checkpoint import fold_logit_affine_into_checkpoint
from ..reliability import plot_reliability
from ..vector import apply_vector_scaling, choose_vector_or_temperature, fit_vector_scaling
from .ensemble import calibrate_ensemble
from .records import metric_summary
from .step import (calibrate_output_folder, check_validation_complete, evaluate_streamed, gt_folder_for, plans_of,
                   source_of, statistics_of_folds, streamed_cases, validation_cases_of_fold)


def validation_logits(folder: Path, device: str, progress: bool = True):
    """Yield (case, logits (C, *network grid) float16 tensor, target (*network grid) int64, properties,
    predictor) per validation case of a fold, the logits computed as nnU-Net's ``perform_actual_validation``
    computes them (the predictor is the fold's, for nnU-Net's export of the case)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    fold = fold_name(folder)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder.parent), [fold if fold == "all" else int(fold)],
                                                   CHECKPOINT_FINAL)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise ValueError("vector scaling supports single-stage configurations, not cascade stages; use --method temperature")
    data_folder = Path(nnUNet_preprocessed) / folder.parent.parent.name / predictor.configuration_manager.data_identifier
    cases = validation_cases_of_fold(folder) or sorted({
        p.name[:-4] for p in [*FoldFolder.at(folder).validation_statistics.glob("*.npz"),
                              *FoldFolder.at(folder).validation.glob("*.npz")]})
    dataset = infer_dataset_class(str(data_folder))(str(data_folder), cases)
    ignore = predictor.label_manager.ignore_label
    for case in tqdm(dataset.identifiers, desc=f"logits of {folder.name}", disable=not progress):
        data, seg, _, properties = dataset.load_case(case)
        with torch.inference_mode():
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:]))).cpu()
        target = torch.from_numpy(np.asarray(seg[:])[0].astype(np.int64)).clamp_(min=0)  # -1: outside the nonzero mask
        if ignore is not None:
            target[target == ignore] = -1
        yield case, logits, target, properties, predictor


def sample_rows(logits: torch.Tensor, target: torch.Tensor, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded uniform sample of at most ``limit`` voxels with a label (target ≥ 0): (rows (n, C), labels (n,))."""
    flat, labels = logits.reshape(logits.shape[0], -1), target.reshape(-1)
    index = torch.nonzero(labels >= 0).squeeze(1)
    if index.numel() > limit:
        keep = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
        index = index[keep.sort().values]
    return flat[:, index].T.float(), labels[index]


def calibrate_vector(folders: list[Path], max_voxels: int = MAX_VOXELS, seed: int = SEED, region: str = METRIC_REGION,
                     fit_region: str | None = None, device: str = "cpu", log: Callable[..., None] = print,
                     progress: bool = True, fallback: bool = True, write: bool = True) -> dict:
    """Vector scaling for one fold or, with several, for their ensemble (one map folded into every fold).

    ``fallback``: run temperature scaling instead when vector scaling does not beat it in cross-validation
    (the default); False keeps vector scaling anyway (the comparison is recorded either way).
    ``write``: False measures only (the benchmark): nothing is folded or recorded, and the returned record holds
    the full evaluations before and after.
    """
    folders = [Path(f) for f in folders]
    if not write:
        return _calibrate_vector(folders, max_voxels, seed, region, fit_region, device, log, progress, fallback, write)
    with fold_locks(folders):
        return _calibrate_vector(folders, max_voxels, seed, region, fit_region, device, log, progress, fallback, write)


def _calibrate_vector(folders: list[Path], max_voxels: int, seed: int, region: str, fit_region: str | None, device: str,
                      log: Callable[..., None], progress: bool, fallback: bool, write: bool) -> dict:
    trainer_folder = folders[0].resolve().parent
    fit_region = fit_region or FIT_REGION
    streamed = [streamed_cases(folder, None, region, fit_region) for folder in folders]
    for folder, cases in zip(folders, streamed):
        if cases is None:
            check_validation_complete(folder)  # its .npz, for the metrics before
    cases = [c for f in folders for c in (validation_cases_of_fold(f) or [])]
    per_case = max(1, max_voxels // max(1, len(cases)))
    rows, labels, groups, stored, export = [], [], [], [], None
    with partial_folder(trainer_folder) as tmp:
        for folder in folders:
            for case, logits, target, properties, predictor in validation_logits(folder, device, progress):
                r, y = sample_rows(logits, target, per_case, seed + len(stored))
                rows.append(r), labels.append(y), groups.append(torch.full((y.numel(),), len(stored)))
                np.save(Path(tmp) / f"{case}.npy", logits.numpy())
                stored.append((case, properties))
                export = (predictor.configuration_manager, predictor.plans_manager, predictor.dataset_json)
        rows_t, labels_t, groups_t = torch.cat(rows), torch.cat(labels), torch.cat(groups)
        choice = choose_vector_or_temperature(rows_t, labels_t, groups_t)
        log(f"nnunet-mbls calibration (--method vector): {choice['reason']}")
        method = {"requested": "vector", **choice, "fit_grid": "network grid (nnU-Net's preprocessed segmentation)",
                  "voxels": f"seeded uniform sample of at most {per_case} labelled voxels per case",
                  "subsample_size": int(labels_t.numel())}
        method["fallback"] = fallback
        if choice["chosen"] == "temperature" and fallback:
            return fall_back_to_temperature(folders, method, max_voxels, seed, region, fit_region, log, progress)
        scale, bias = fit_vector_scaling(rows_t, labels_t)
        after_folder, after_statistics = Path(tmp) / "after", Path(tmp) / "after_statistics"
        after_folder.mkdir()
        dataset_json = json.loads((trainer_folder / "dataset.json").read_text())
        gt, plans = gt_folder_for(folders[0]), plans_of(trainer_folder)
        job = StatisticsExport(StatisticsSettings(len(LabelInfo.from_dataset_json(dataset_json).names),
                                                  LabelInfo.from_dataset_json(dataset_json).ignore_label, region,
                                                  fit_region, seed=seed), str(gt), str(after_statistics), "vector")
        after_statistics.mkdir()
        for case, properties in stored:  # nnU-Net's export of the transformed logits, statistics streamed out of it
            transformed = apply_vector_scaling(np.load(Path(tmp) / f"{case}.npy").astype(np.float32), scale, bias)
            export_with_statistics(job, torch.from_numpy(transformed), properties, *export, str(after_folder / case))
        if all(c is None for c in streamed):  # the .npz route, as before
            before = evaluate_folder(gt, [FoldFolder.at(f).validation for f in folders], dataset_json, region=region,
                                     chill=True, plans=plans, progress=progress)
        else:
            with statistics_of_folds([FoldFolder.at(f) for f in folders], streamed, [None] * len(folders), dataset_json,
                                     region, fit_region, seed, progress) as (statistics_folders, fold_cases):
                before, _ = evaluate_streamed(gt, statistics_folders, [FoldFolder.at(f).validation for f in folders],
                                              fold_cases, dataset_json, progress)
        after, _ = evaluate_streamed(gt, [after_statistics], [after_folder], [[case for case, _ in stored]], dataset_json,
                                     progress)
    vector = {"scale": scale.tolist(), "bias": bias.tolist(),
              "map": "logits -> scale * logits + bias per class, folded into decoder.seg_layers[-1]"}
    if not write:
        return {"method": method, "vector_scaling": vector, "before": before, "after": after}
    details = FoldFolder.at(folders[0]).calibration_details if len(folders) == 1 else trainer_folder / ENSEMBLE_DETAILS
    atomic_write_json(details / "evaluation_before.json", before)
    atomic_write_json(details / "evaluation_after.json", after)
    plot_reliability({f"before (ECE {before['mean']['ece']:.4f})": before["reliability"],
                      f"after vector scaling (ECE {after['mean']['ece']:.4f})": after["reliability"]},
                     details / "reliability.png", title=f"{trainer_folder.name}: {region} voxels, pooled")
    record = {"method": method, "vector_scaling": vector, "metric_region": region, "num_cases": before["num_cases"],
              "before": metric_summary(before), "after": metric_summary(after), "nnunet_mbls_version": __version__}
    for folder in folders:
        fold = FoldFolder.at(folder)
        fold_logit_affine_into_checkpoint(fold.checkpoint_final, fold.calibrated_checkpoint, scale, bias,
                                          overwrite=True)
        own_file = fold.calibration_record
        if len(folders) == 1:
            own = dict(record)
        else:  # the fold's own record (its own temperature, if it had a calibration step) stays
            own = json.loads(own_file.read_text()) if own_file.is_file() else {}
        own.update(calibrated_checkpoint=CALIBRATED_CHECKPOINT, checkpoint_temperature=None,
                   source_checkpoint=source_of(fold.calibrated_checkpoint),
                   checkpoint_calibration="vector scaling" + (f" shared by folds {[f.name for f in folders]} (../{ENSEMBLE_RECORD})"
                                                              if len(folders) > 1 else " of this fold"),
                   vector_scaling=vector)
        atomic_write_json(own_file, own)
    if len(folders) > 1:
        atomic_write_json(trainer_folder / ENSEMBLE_RECORD, {**record, "folds": [fold_name(f) for f in folders]})
    log(f"nnunet-mbls calibration: vector scaling; {region} ECE {before['mean']['ece']:.4f} -> {after['mean']['ece']:.4f}, "
        f"NLL {before['mean']['nll']:.4f} -> {after['mean']['nll']:.4f}")
    return record


def fall_back_to_temperature(folders: list[Path], method: dict, max_voxels: int, seed: int, region: str,
                             fit_region: str | None, log: Callable[..., None], progress: bool) -> dict:
    """The ordinary temperature calibration, with the vector-vs-temperature comparison recorded."""
    if len(folders) == 1:
        summary = calibrate_output_folder(folders[0], max_voxels, seed, region, log, progress, fit_region=fit_region)
        record_file = FoldFolder.at(folders[0]).calibration_record
    else:
        summary = calibrate_ensemble(folders, max_voxels, seed, region, fit_region, log, progress)
        record_file = FoldFolder.at(folders[0]).ensemble_record
    summary["method"] = method
    atomic_write_json(record_file, summary)
    return summary

