"""Online calibration monitoring: foreground ECE of nnU-Net's validation batches, once per epoch.

The per-batch state is the flat vector of a :class:`CalibrationAccumulator`'s sums, so batches
(and DDP ranks) are combined by adding vectors. The value is logged in nnU-Net's logger under
``val_fg_ece`` (so it is saved in checkpoints and forwarded to W&B when enabled) and drawn with
the pseudo Dice in ``progress_calibration.png`` next to nnU-Net's ``progress.png``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..calibration.metrics import CalibrationAccumulator
from ..io import atomic_write
from ..plotting import default_style

ONLINE_ECE_KEY = "val_fg_ece"


def add_online_ece_to_logger(logger) -> None:
    """Register ``val_fg_ece`` in nnU-Net's local logger, also when a checkpoint without it is loaded."""
    local = logger.local_logger
    local.my_fantastic_logging.setdefault(ONLINE_ECE_KEY, [])
    original_load = local.load_checkpoint

    def load_checkpoint(checkpoint: dict) -> None:
        original_load(checkpoint)
        epochs = len(checkpoint.get("train_losses", []))
        local.my_fantastic_logging.setdefault(ONLINE_ECE_KEY, [float("nan")] * epochs)

    local.load_checkpoint = load_checkpoint


def sum_over_ranks(state: np.ndarray) -> np.ndarray:
    """Sum a flat state vector over the DDP ranks (every rank gets the sum); unchanged without DDP."""
    from torch import distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return state
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return np.sum(gathered, axis=0)


class OnlineECE:
    """Foreground (ground truth ≠ 0, not ignored) top-label ECE of validation batches."""

    def __init__(self, num_classes: int, n_bins: int = 15) -> None:
        self.num_classes, self.n_bins = num_classes, n_bins

    def _accumulator(self) -> CalibrationAccumulator:
        return CalibrationAccumulator(self.num_classes, self.n_bins)

    @torch.no_grad()
    def batch_state(self, logits: Tensor, target: Tensor, ignore_label: int | None = None) -> np.ndarray:
        """Sums of one batch: logits (B, C, *spatial), target (B, 1, *spatial) -> flat float64 vector.

        The batch is one accumulator update over (C, B, *spatial): the states are sums over voxels, so
        this equals adding the items one by one, at a fraction of the per-call overhead.
        """
        accumulator = self._accumulator()
        probs = torch.softmax(logits.float(), dim=1).movedim(1, 0)  # (C, B, *spatial)
        labels = target[:, 0].long()
        foreground = labels != 0
        if ignore_label is not None:
            foreground &= labels != ignore_label
        accumulator.update(probs, torch.where(foreground, labels, 0), mask=foreground)
        return np.concatenate([t.detach().cpu().double().numpy().ravel() for t in accumulator.state_tensors()])

    def ece_from_state(self, state: np.ndarray) -> float:
        """ECE of summed batch states (NaN when no foreground voxel was seen)."""
        accumulator = self._accumulator()
        tensors, offset = [], 0
        for template in accumulator.state_tensors():
            tensors.append(torch.from_numpy(state[offset : offset + template.numel()]).reshape(template.shape).to(template))
            offset += template.numel()
        accumulator.load_state_tensors(tensors)
        return float(accumulator.compute()["ece"])

    @staticmethod
    def plot(logger, output_folder: str) -> None:
        """Write progress_calibration.png: pseudo Dice (EMA) and foreground ECE per epoch."""
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        ece = logger.get_value(ONLINE_ECE_KEY, step=None)
        dice = logger.get_value("ema_fg_dice", step=None)[: len(ece)]
        with default_style():
            fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
            ax.plot(range(len(dice)), dice, color="g", marker=".", label="pseudo Dice (mov. avg.)")
            ax.set_ylabel("pseudo Dice")
            ax.legend(loc="lower right")
            ax2.plot(range(len(ece)), ece, color="m", marker=".", label="foreground ECE (validation batches)")
            ax2.set_ylabel("foreground ECE")
            ax2.set_xlabel("epoch")
            ax2.legend(loc="upper right")
            fig.tight_layout()
            atomic_write(os.path.join(output_folder, "progress_calibration.png"), lambda tmp: fig.savefig(tmp, format="png"))
            plt.close(fig)
