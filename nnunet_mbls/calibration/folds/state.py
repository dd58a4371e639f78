"""Whether a fold (or an ensemble of folds) is calibrated, read from what its files say, never from their times."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...io import file_sha256, read_json_file
from ...layout import FoldFolder, fold_name


def calibration_problem(folder: Path) -> str | None:
    """None when the fold's calibration is complete and describes the fold's current checkpoint, else why not.

    Decided from what the files say, not from their times: ``calibration.json`` is a complete record; its
    calibrated checkpoint loads, holds the map the record names (``checkpoint_temperature``, or
    ``vector_scaling``) and derives from today's ``checkpoint_final.pth`` (or the checkpoint the record names as
    ``source_checkpoint``: ``checkpoint_best.pth`` after ``--val_best``; SHA-256 recorded in both). Records of
    nnunet-mbls 0.2, which carry no hash, count when they are newer than ``checkpoint_final.pth``.

    Args:
        folder: the fold folder.

    Returns:
        None, or one sentence naming the file that is missing, broken or inconsistent.
    """
    fold = FoldFolder.at(folder)
    record_file = fold.calibration_record
    try:
        record = read_json_file(record_file, "calibration record")
    except ValueError as e:
        return str(e)
    if not isinstance(record, dict) or not isinstance(record.get("after"), dict) or not record.get("calibrated_checkpoint"):
        return f"{record_file} is incomplete (no 'after' metrics or no 'calibrated_checkpoint')"
    source = record.get("source_checkpoint")
    # the trained checkpoint T was fitted on: checkpoint_final.pth, or checkpoint_best.pth after --val_best
    trained = fold.path / source["file"] if isinstance(source, dict) and "file" in source else fold.checkpoint_final
    if not trained.is_file():
        return f"{trained} does not exist"
    calibrated = fold.path / str(record["calibrated_checkpoint"])
    try:
        checkpoint = torch.load(calibrated, map_location="cpu", weights_only=False, mmap=True)
        held = folded_map(checkpoint)
    except Exception as e:  # missing, truncated, not a torch file, no folded map: all mean "redo the step"
        return f"{calibrated} cannot be loaded as a calibrated checkpoint ({type(e).__name__}: {e})"
    recorded = recorded_map(record, len(held[0]))
    if recorded is None or not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                                   for x, y in zip(held, recorded) for a, b in zip(x, y)):
        return f"{calibrated} holds the map {held} but {record_file} records {recorded}"
    if source is None:  # a 0.2 record: no hash to compare
        return None if record_file.stat().st_mtime >= trained.stat().st_mtime else f"{trained} is newer than {record_file}"
    if checkpoint.get("mbls_source") != source:
        return f"{calibrated} derives from another checkpoint than the one {record_file} names"
    if file_sha256(trained) != source.get("sha256"):
        return f"{trained} changed after the calibration (training continued?)"
    return None


def folded_map(checkpoint: dict) -> tuple[list[float], list[float]]:
    """(scale, bias) per class that a calibrated checkpoint's head applies to the logits."""
    affine = checkpoint["mbls_logit_affine"]
    return [float(v) for v in affine["scale"]], [float(v) for v in affine["bias"]]


def recorded_map(record: dict, num_classes: int) -> tuple[list[float], list[float]] | None:
    """(scale, bias) per class that a calibration.json says its calibrated checkpoint holds (None: invalid)."""
    T = record.get("checkpoint_temperature")
    vector = record.get("vector_scaling")
    regions = record.get("region_temperatures")
    if isinstance(T, (int, float)) and not isinstance(T, bool) and T > 0:
        return [1.0 / T] * num_classes, [0.0] * num_classes
    if isinstance(regions, dict) and regions:
        return [1.0 / float(t) for t in regions.values()], [0.0] * len(regions)
    if isinstance(vector, dict):
        return [float(v) for v in vector["scale"]], [float(v) for v in vector["bias"]]
    return None


def ensemble_problem(folders: list[Path]) -> str | None:
    """None when calibration_ensemble.json lists exactly these folds and every fold's calibration (see
    :func:`calibration_problem`) holds the ensemble's map (its temperature or vector scaling), else why not."""
    folders = [Path(f) for f in folders]
    record_file = FoldFolder.at(folders[0]).ensemble_record
    try:
        record = read_json_file(record_file, "ensemble calibration record")
    except ValueError as e:
        return str(e)
    listed = record.get("folds") if isinstance(record, dict) else None
    if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(fold_name(f) for f in folders):
        return f"{record_file} lists folds {listed}, not these"
    for folder in folders:
        problem = calibration_problem(folder)
        if problem is not None:
            return problem
        own = json.loads(FoldFolder.at(folder).calibration_record.read_text())
        num_classes = len(recorded_map(own, 1)[0]) if own.get("vector_scaling") else 1
        shared = recorded_map({"checkpoint_temperature": record.get("temperature"),
                               "vector_scaling": record.get("vector_scaling")}, num_classes)
        if recorded_map(own, num_classes) != shared:
            return f"{FoldFolder.at(folder).calibrated_checkpoint} does not hold the shared calibration of {record_file}"
    return None
