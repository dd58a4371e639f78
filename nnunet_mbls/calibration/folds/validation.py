"""nnU-Net's final validation of a fold with the calibration statistics streamed out of its export (no ``.npz``):
what our trainers run after training, and what ``nnunet-mbls calibrate`` runs on any trained fold (stock
``nnUNetTrainer`` included) whose statistics are missing or were computed by other weights."""

from __future__ import annotations

import os

import torch

from ...defaults import FIT_REGION, METRIC_REGION, REGION_SAMPLE, SEED
from ...layout import FoldFolder
from ..case_statistics import StatisticsSettings
from ..evaluation.export import RegionStatisticsExport, StatisticsExport, streaming_validation_export, weights_id
from ..region_statistics import RegionSettings
from .step import CalibrationStepError, gt_folder_for


def statistics_export(trainer, region: str = METRIC_REGION, fit_region: str = FIT_REGION,
                      seed: int = SEED) -> StatisticsExport:
    """What the validation export of an nnU-Net trainer instance streams, and where (its fold's
    ``validation_statistics/``), with the weights it holds now."""
    fold = FoldFolder.at(trainer.output_folder)
    labels = trainer.label_manager
    if labels.has_regions:  # one sigmoid output per region: region statistics (per-region temperature)
        settings = RegionSettings(tuple(tuple(r) if isinstance(r, (list, tuple)) else (int(r),)
                                        for r in labels.foreground_regions),
                                  labels.ignore_label, seed, REGION_SAMPLE)
        return RegionStatisticsExport(settings, str(gt_folder_for(fold.path)), str(fold.validation_statistics),
                                      weights_id(trainer.network))
    settings = StatisticsSettings(num_classes=trainer.label_manager.num_segmentation_heads,
                                  ignore_label=trainer.label_manager.ignore_label, region=region,
                                  fit_region=fit_region, seed=seed)
    return StatisticsExport(settings, str(gt_folder_for(fold.path)), str(fold.validation_statistics),
                            weights_id(trainer.network))


def run_streamed_validation(dataset: str, configuration: str, fold: str, trainer: str, plans: str, device: str,
                            region: str = METRIC_REGION, fit_region: str = FIT_REGION, seed: int = SEED,
                            job_of=None) -> str:
    """nnU-Net's final validation of ``checkpoint_final.pth`` (as ``nnUNetv2_train ... --val``), in this process,
    streaming the statistics (or what ``job_of(trainer instance)``'s export streams: e.g. conformal curves);
    returns the weights' id."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from ...paths import env_with_ext_trainers

    os.environ["nnUNet_extTrainer"] = env_with_ext_trainers()["nnUNet_extTrainer"]
    instance = get_trainer_from_args(str(dataset), configuration, int(fold) if fold != "all" else fold, trainer, plans,
                                     device=torch.device(device))
    maybe_load_checkpoint(instance, continue_training=False, validation_only=True)
    job = job_of(instance) if job_of is not None else statistics_export(instance, region, fit_region, seed)
    with streaming_validation_export(job):
        # the stock method: our trainers' own override would run the calibration step a second time
        nnUNetTrainer.perform_actual_validation(instance, save_probabilities=False)
    return job.model_id
