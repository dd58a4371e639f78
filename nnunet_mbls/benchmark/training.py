"""Training one benchmark cell through nnU-Net's own trainer machinery, resumably."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from tqdm import tqdm

from ..paths import env_with_ext_trainers
from .grid import Cell


def train_cell(cell: Cell, device: str = "cuda", epochs: int | None = None, iterations: int | None = None,
               log_file: str | os.PathLike | None = None) -> None:
    """Train ``cell`` as ``nnUNetv2_train D C F -tr T -p P [--c]`` does on one device.

    nnU-Net's ``get_trainer_from_args``, ``maybe_load_checkpoint``, ``run_training`` and
    ``perform_actual_validation`` run in this process, the validation export streaming the calibration statistics
    (our trainers do it themselves; for any other trainer it is done here, so its calibration step needs no second
    validation pass and no probability file). An interrupted run
    continues from ``checkpoint_latest.pth``; a finished one is left alone. ``epochs``/``iterations``
    override the trainer's budget (the demo's short schedule); None keeps the trainer's own.
    nnU-Net's console output goes to ``log_file`` (its training log is written as usual) and a
    progress bar over epochs is shown instead.

    Args:
        cell: the cell to train; nothing happens when it is trained already.
        device: the torch device (default ``"cuda"``).
        epochs: number of epochs; None keeps the trainer's own.
        iterations: training iterations per epoch (validation iterations become max(1, iterations // 2));
            None keeps the trainer's own.
        log_file: file nnU-Net's console output is appended to; None discards it.
    """
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if cell.is_trained():
        return
    os.environ["nnUNet_extTrainer"] = env_with_ext_trainers()["nnUNet_extTrainer"]
    resume = (cell.folder / "checkpoint_latest.pth").is_file()
    with open(log_file or os.devnull, "a") as sink, contextlib.redirect_stdout(sink):
        trainer = get_trainer_from_args(cell.dataset, cell.configuration, int(cell.fold) if cell.fold != "all" else "all",
                                        cell.trainer, cell.plans, continue_training=resume, device=torch.device(device))
        if epochs is not None:
            trainer.num_epochs = epochs
        if iterations is not None:
            trainer.num_iterations_per_epoch = iterations
            trainer.num_val_iterations_per_epoch = max(1, iterations // 2)
        maybe_load_checkpoint(trainer, continue_training=resume, validation_only=False)
        bar = tqdm(total=trainer.num_epochs, initial=trainer.current_epoch, desc=f"train {cell.trainer} fold {cell.fold}",
                   unit="epoch", file=sys.stderr)
        on_epoch_end = trainer.on_epoch_end

        def on_epoch_end_with_progress():
            """nnU-Net's ``on_epoch_end``, then one step of the progress bar with the EMA pseudo Dice."""
            on_epoch_end()
            bar.update(1)
            bar.set_postfix(pseudo_dice=f"{trainer.logger.get_value('ema_fg_dice', step=-1):.3f}")

        trainer.on_epoch_end = on_epoch_end_with_progress
        trainer.run_training()
        bar.close()
        validate_streaming(trainer)


def validate_streaming(trainer) -> None:
    """nnU-Net's final validation of a trainer instance with the statistics streamed (no ``.npz``)."""
    from ..calibration.evaluation.export import streaming_validation_export
    from ..calibration.folds.validation import statistics_export
    from ..trainers.base import nnUNetTrainerCalibrated

    if isinstance(trainer, nnUNetTrainerCalibrated) or trainer.label_manager.has_regions:
        # ours stream and run their calibration step themselves; region-based labels have no statistics (the
        # calibration step refuses them with its message), so their validation stays nnU-Net's own
        trainer.perform_actual_validation(save_probabilities=False)
        return
    with streaming_validation_export(statistics_export(trainer)):
        trainer.perform_actual_validation(save_probabilities=False)

