"""nnU-Net's validation export with the calibration statistics streamed out of it (no probability file).

nnU-Net's ``perform_actual_validation`` sends each case's logits to ``export_prediction_from_logits`` in its
'spawn' export pool. Inside :func:`streaming_validation_export` that name points to :func:`export_with_statistics`
(a picklable ``functools.partial``), which resamples the logits as nnU-Net does, writes the same segmentation,
and, while the case's logits are in memory, writes its :class:`~nnunet_mbls.calibration.case_statistics.CaseStatistics`
(a few MB) into the fold's ``validation_statistics/``. The ``.npz``/``.pkl`` are written only when the caller asked
for them (``--npz``), by nnU-Net's own export. Under DDP every rank exports its share of the cases, so the
per-case files need no merging.
"""

from __future__ import annotations

import functools
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..case_statistics import CaseStatistics, StatisticsSettings, case_statistics


@dataclass(frozen=True)
class StatisticsExport:
    """Where and how the export workers write statistics (picklable).

    ``reference_folder``: nnU-Net's ``gt_segmentations``; ``output_folder``: the fold's ``validation_statistics``;
    ``model_id``: :func:`weights_id` of the weights being validated, stored in every file.
    """

    settings: StatisticsSettings
    reference_folder: str
    output_folder: str
    model_id: str

    def statistics_of(self, case: str, logits, ref: np.ndarray, properties: dict, transpose_forward,
                      segmentation: np.ndarray) -> CaseStatistics:
        """The case's statistics (:func:`~nnunet_mbls.calibration.case_statistics.case_statistics`)."""
        return case_statistics(case, logits, ref, properties, transpose_forward, self.settings, segmentation)


@dataclass(frozen=True)
class RegionStatisticsExport(StatisticsExport):
    """:class:`StatisticsExport` of a region-based model (``settings`` are
    :class:`~nnunet_mbls.calibration.region_statistics.RegionSettings`)."""

    def statistics_of(self, case: str, logits, ref: np.ndarray, properties: dict, transpose_forward,
                      segmentation: np.ndarray):
        """The case's :func:`~nnunet_mbls.calibration.region_statistics.region_case_statistics`."""
        from ..region_statistics import region_case_statistics

        return region_case_statistics(case, logits, ref, properties, transpose_forward, self.settings)


def weights_id(network: torch.nn.Module | dict) -> str:
    """SHA-256 (first 16 hex digits) of a network's weights: the same on every DDP rank and for the state dict in
    ``checkpoint_final.pth`` (``network_weights``), so statistics name the weights that predicted them.

    Args:
        network: a network (DDP and ``torch.compile`` wrappers are looked through, as nnU-Net's checkpoint saving
            does) or a state dict.
    """
    if isinstance(network, torch.nn.Module):
        network = getattr(network, "module", network)
        network = getattr(network, "_orig_mod", network)
        network = network.state_dict()
    digest = hashlib.sha256()
    for key in sorted(network):
        digest.update(key.encode())
        digest.update(network[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def resampled_logits(logits, properties: dict, configuration_manager, plans_manager):
    """The logits resampled to the original spacing, still in nnU-Net's transposed, cropped frame: the first step
    of nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` (2.8.1), the same call."""
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current_spacing = configuration_manager.spacing if \
        len(configuration_manager.spacing) == len(properties["shape_after_cropping_and_before_resampling"]) else \
        [spacing_transposed[0], *configuration_manager.spacing]
    return configuration_manager.resampling_fn_probabilities(
        logits, properties["shape_after_cropping_and_before_resampling"], current_spacing, spacing_transposed)


def segmentation_in_original_frame(logits, properties: dict, plans_manager, label_manager) -> np.ndarray:
    """nnU-Net's segmentation of resampled logits, put back into the uncropped image in the original axis order
    (the rest of ``convert_predicted_logits_to_segmentation_with_correct_shape`` without probabilities)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    segmentation = label_manager.convert_logits_to_segmentation(logits)
    full = np.zeros(properties["shape_before_cropping"],
                    dtype=np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16)
    full = insert_crop_into_image(full, segmentation, properties["bbox_used_for_cropping"])
    if isinstance(full, torch.Tensor):
        full = full.cpu().numpy()
    return full.transpose(plans_manager.transpose_backward)


def export_with_statistics(job: StatisticsExport, predicted_logits, properties: dict, configuration_manager,
                           plans_manager, dataset_json: dict | str, output_file_truncated: str,
                           save_probabilities: bool = False, num_threads_torch: int | None = None) -> None:
    """``export_prediction_from_logits`` (same arguments after ``job``) that also writes the case's statistics."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads_torch or default_num_processes)
    try:
        case = Path(output_file_truncated).name
        label_manager = plans_manager.get_label_manager(dataset_json)
        logits = torch.as_tensor(resampled_logits(predicted_logits, properties, configuration_manager, plans_manager))
        reader = plans_manager.image_reader_writer_class()
        ref, _ = reader.read_seg(str(Path(job.reference_folder) / f"{case}{dataset_json['file_ending']}"))
        ref = ref[0].astype(np.uint8 if ref.max() < 256 else np.int32)  # nnU-Net's readers return float32 labels
        segmentation = segmentation_in_original_frame(logits, properties, plans_manager, label_manager)
        statistics = job.statistics_of(case, logits, ref, properties, plans_manager.transpose_forward, segmentation)
        statistics.model_id = job.model_id
        statistics.save(Path(job.output_folder) / f"{case}.npz")
        del logits
        if save_probabilities:  # nnU-Net's own export writes the .npz/.pkl the user asked for (and the segmentation)
            export_prediction_from_logits(predicted_logits, properties, configuration_manager, plans_manager,
                                          dataset_json, output_file_truncated, True, num_threads_torch or default_num_processes)
            return
        reader.write_seg(segmentation, output_file_truncated + dataset_json["file_ending"], properties)
    finally:
        torch.set_num_threads(threads)


#: the nnU-Net modules whose export calls :func:`streaming_validation_export` redirects: the trainer's final
#: validation, and the predictor's ``predict_from_files_sequential``
TRAINER_MODULE = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"
PREDICTOR_MODULE = "nnunetv2.inference.predict_from_raw_data"


@contextmanager
def streaming_validation_export(job: StatisticsExport, module: str = TRAINER_MODULE) -> Iterator[None]:
    """Inside this block nnU-Net's ``perform_actual_validation`` (or, with ``module=PREDICTOR_MODULE``, the
    predictor's sequential prediction) exports through :func:`export_with_statistics`.

    nnU-Net looks the export function up by its module-global name when it exports each case, so the name is
    pointed at ``functools.partial(export_with_statistics, job)`` here and restored on exit (nothing of nnU-Net is
    changed outside the block, and nothing on disk).
    """
    import importlib

    exporting = importlib.import_module(module)
    Path(job.output_folder).mkdir(parents=True, exist_ok=True)
    original = exporting.export_prediction_from_logits
    exporting.export_prediction_from_logits = functools.partial(export_with_statistics, job)
    try:
        yield
    finally:
        exporting.export_prediction_from_logits = original


def read_statistics(folder: Path, cases: list[str]) -> Iterator[CaseStatistics]:
    """The statistics of ``cases`` from ``folder`` (``<case>.npz``), one at a time."""
    for case in cases:
        yield CaseStatistics.load(folder / f"{case}.npz")
