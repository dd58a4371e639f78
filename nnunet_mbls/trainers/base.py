"""The shared base of every nnunet-mbls trainer.

A trainer subclass only names its loss (``loss_name``, a key of :data:`nnunet_mbls.losses.LOSSES`)
and its hyper-parameters (``loss_kwargs``). This base builds the loss with nnU-Net's ignore label
and deep-supervision weights (its sigmoid form on region-based datasets, :mod:`nnunet_mbls.losses.regions`), logs the loss, monitors the
foreground ECE of the validation batches every epoch, streams each validation case's calibration statistics
out of nnU-Net's final validation export (no probability file unless ``--npz``), and then runs the calibration
step on them (temperature scaling folded into ``checkpoint_final_calibrated.pth``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs

from ..defaults import MAX_VOXELS
from ..errors import InputError
from ..layout import CHECKPOINT_BEST, CHECKPOINT_FINAL, FoldFolder
from ..calibration.evaluation.export import streaming_validation_export, weights_id
from ..locks import fold_lock
from ..losses import LOSSES, build_loss, build_region_loss
from ..losses.regions import NO_REGION_FORM
from ..losses.registry import USES_NNUNET_DICE
from .online_ece import ONLINE_ECE_KEY, OnlineECE, add_online_ece_to_logger, sum_over_ranks


def deep_supervision_weights(num_scales: int, is_ddp: bool, compiled: bool) -> np.ndarray:
    """nnU-Net's weights: 1/2^i per scale, the lowest scale 0 (1e-6 under DDP without compile), normalised."""
    weights = np.array([1 / (2**i) for i in range(num_scales)])
    weights[-1] = 1e-6 if is_ddp and not compiled else 0
    return weights / weights.sum()


class RegionBasedDatasetError(InputError):
    """A softmax loss was asked to train a region-based (overlapping sigmoid outputs) dataset."""


class nnUNetTrainerCalibrated(nnUNetTrainer):
    """Base class; subclasses set ``loss_name`` and ``loss_kwargs`` and nothing else."""

    loss_name: str = "mbls"
    loss_kwargs: dict[str, Any] = {}
    #: voxel subsample of the calibration step's temperature fit (see ``nnunet_mbls.calibration.folds.step``)
    calibration_max_voxels: int = MAX_VOXELS
    #: worker processes of the calibration step ('spawn', like nnU-Net's validation export pool just before it in
    #: this process); None: nnU-Net's default_num_processes (see ``nnunet_mbls.calibration.evaluation.evaluate_folder``)
    calibration_num_processes: int | None = None

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions and self.loss_name in NO_REGION_FORM:
            raise RegionBasedDatasetError(
                f"{self.__class__.__name__} trains with {self.loss_name}, which has no sigmoid form for this dataset's "
                f"region-based labels ({NO_REGION_FORM[self.loss_name]}). Use nnUNetTrainerMbLS, nnUNetTrainerMbLSDice, "
                f"nnUNetTrainerCE, nnUNetTrainerFocal or nnUNetTrainerLS (their sigmoid forms), stock nnUNetTrainer, "
                f"or rewrite the labels as mutually exclusive integer labels."
            )
        self.online_ece = OnlineECE(num_classes=self.label_manager.num_segmentation_heads)
        add_online_ece_to_logger(self.logger)

    def build_plain_loss(self) -> torch.nn.Module:
        """The loss for one (logits, target) pair, before deep supervision."""
        kwargs = dict(self.loss_kwargs, ignore_label=self.label_manager.ignore_label)
        if self.loss_name in USES_NNUNET_DICE:
            kwargs.update(batch_dice=self.configuration_manager.batch_dice, ddp=self.is_ddp)
        try:  # region-based datasets: the loss's sigmoid form (nnunet_mbls.losses.regions)
            return (build_region_loss if self.label_manager.has_regions else build_loss)(self.loss_name, **kwargs)
        except ValueError as error:
            if self.loss_name not in LOSSES:  # the name is wrong, not the hyper-parameters: build_loss says so
                raise
            raise ValueError(f"{type(self).__name__}.loss_kwargs: {error}") from error

    def _build_loss(self):
        loss = self.build_plain_loss()
        self.print_to_log_file(
            f"nnunet-mbls loss: {type(loss).__name__} ({self.loss_name}) {loss.hyper_parameters}, "
            f"ignore_label={self.label_manager.ignore_label}, deep supervision={self.enable_deep_supervision}"
        )
        if self.enable_deep_supervision:
            weights = deep_supervision_weights(
                len(self._get_deep_supervision_scales()), self.is_ddp, self._do_i_compile()
            )
            loss = DeepSupervisionWrapper(loss, weights)
        return loss

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if not math.isfinite(float(result["loss"])):
            raise FloatingPointError(
                f"{self.__class__.__name__}: the training loss became {float(result['loss'])} at epoch "
                f"{self.current_epoch}: the network diverged (NaN/Inf logits) or the batch holds NaN/Inf. Training "
                f"stopped so that no NaN model is saved. Check the images for NaN/Inf (nnUNetv2_plan_and_preprocess "
                f"--verify_dataset_integrity) or lower the learning rate; checkpoint_best.pth and checkpoint_latest.pth "
                f"(written every {self.save_every} epochs) hold earlier finite states, and nnUNetv2_train ... --c "
                f"resumes from checkpoint_latest.pth."
            )
        return result

    def validation_step(self, batch: dict) -> dict:
        if self.label_manager.has_regions:  # the online ECE is a softmax one; regions are calibrated after training
            return super().validation_step(batch)
        # nnU-Net's validation_step keeps the network output to itself; we see it when it reaches the loss
        loss, captured = self.loss, {}

        def loss_and_capture(output, target):
            highest = (output[0], target[0]) if self.enable_deep_supervision else (output, target)
            captured["state"] = self.online_ece.batch_state(*highest, ignore_label=self.label_manager.ignore_label)
            return loss(output, target)

        self.loss = loss_and_capture
        try:
            result = super().validation_step(batch)
        finally:
            self.loss = loss
        result[ONLINE_ECE_KEY] = captured["state"]
        return result

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        if self.label_manager.has_regions:
            return super().on_validation_epoch_end(val_outputs)
        states = collate_outputs(val_outputs)[ONLINE_ECE_KEY].sum(0)
        if self.is_ddp:
            states = sum_over_ranks(states)
        for output in val_outputs:
            output.pop(ONLINE_ECE_KEY)
        super().on_validation_epoch_end(val_outputs)
        self.logger.log(ONLINE_ECE_KEY, self.online_ece.ece_from_state(states), self.current_epoch)

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.label_manager.has_regions:
            return
        self.print_to_log_file("Foreground ECE (validation batches)", np.round(self.logger.get_value(ONLINE_ECE_KEY, step=-1), 4))
        if self.local_rank == 0:
            self.online_ece.plot(self.logger, self.output_folder)

    def perform_actual_validation(self, save_probabilities: bool = False):
        # nnU-Net's validation, with each case's calibration statistics streamed out of its export workers into
        # validation_statistics/ (a few MB per case); the .npz/.pkl are written only when the user asked (--npz)
        from ..calibration.folds.validation import statistics_export

        with streaming_validation_export(statistics_export(self)):
            if self.local_rank != 0:
                return super().perform_actual_validation(save_probabilities)
            with fold_lock(self.output_folder, what="nnUNetv2_train's validation and calibration step"):
                super().perform_actual_validation(save_probabilities)
                self.run_calibration_step()

    def checkpoint_holding(self, model_id: str) -> str | None:
        """The checkpoint file of this fold whose weights have id ``model_id`` (the validated ones):
        ``checkpoint_final.pth``, ``checkpoint_best.pth`` after ``nnUNetv2_train ... --val_best``, or None (e.g.
        ``--disable_checkpointing``; a file left by an earlier run holds other weights)."""
        for name in (CHECKPOINT_FINAL, CHECKPOINT_BEST):
            path = Path(self.output_folder) / name
            if path.is_file():
                checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
                if weights_id(checkpoint["network_weights"]) == model_id:
                    return name
        return None

    def run_calibration_step(self) -> None:
        """Our calibration step on nnU-Net's validation output (rank 0).

        It runs after ``checkpoint_final.pth`` and nnU-Net's validation are on disk, so a failure here costs
        no training: it is written to the training log and stderr with the command that redoes the step, and
        raised again (``nnUNetv2_train`` exits with status 1, so a scheduler sees it).
        """
        from ..calibration.folds import CalibrationStepError, calibrate_output_folder
        from ..calibration.folds.region_step import calibrate_region_fold

        _, val_keys = self.do_split()
        model_id = weights_id(self.network)
        try:
            if self.label_manager.has_regions:
                calibrate_region_fold(Path(self.output_folder), list(val_keys), model_id, self.checkpoint_holding(model_id),
                                      self.print_to_log_file, max_voxels=self.calibration_max_voxels)
                return
            calibrate_output_folder(self.output_folder, log=self.print_to_log_file, expected_cases=list(val_keys),
                                    max_voxels=self.calibration_max_voxels,
                                    num_processes=self.calibration_num_processes, model_id=model_id,
                                    checkpoint=self.checkpoint_holding(model_id))
        except Exception as error:
            message = (
                f"nnunet-mbls: the calibration step failed ({type(error).__name__}: {error}). Training and nnU-Net's "
                f"validation are complete and kept (checkpoint_final.pth, validation/). Redo only the calibration step "
                f"with:\n    {FoldFolder.at(self.output_folder).calibrate_command()}"
            )
            self.print_to_log_file(message)
            print(message, file=sys.stderr, flush=True)
            raise CalibrationStepError(message) from error
