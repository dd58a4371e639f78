"""Online calibration monitoring: foreground ECE of nnU-Net's validation batches, once per epoch.

The per-batch state is a flat vector of per-bin sums (:class:`OnlineECE`), so batches (and DDP ranks)
are combined by adding vectors. The value is logged in nnU-Net's logger under
``val_fg_ece`` (so it is saved in checkpoints and forwarded to W&B when enabled) and drawn with
the pseudo Dice in ``progress_calibration.png`` next to nnU-Net's ``progress.png``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..calibration.metrics import bin_index
from ..defaults import N_BINS
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
    """Foreground (ground truth ≠ 0, not ignored) top-label ECE of validation batches.

    The state of a batch is what the ECE needs and no more: per equal-width confidence bin (the bins of
    :func:`~nnunet_mbls.calibration.metrics.bin_index`), the voxel count, the sum of confidences and the number
    of correct voxels, ``3 * n_bins`` float64 sums that add over batches and DDP ranks. (The full
    :class:`~nnunet_mbls.calibration.metrics.CalibrationAccumulator` state, with NLL, Brier, classwise and
    adaptive-ECE histograms, doubled nnU-Net's validation step on an H200: docs/BENCHMARKS.md, section 3.6.)
    """

    def __init__(self, num_classes: int, n_bins: int = N_BINS) -> None:
        self.num_classes, self.n_bins = num_classes, n_bins

    @torch.no_grad()
    def batch_state(self, logits: Tensor, target: Tensor, ignore_label: int | None = None) -> np.ndarray:
        """Sums of one batch as a flat float64 vector of length ``3 * n_bins`` (count, confidence, correct per bin).

        Args:
            logits: (B, C, *spatial) network output of the highest resolution.
            target: (B, 1, *spatial) integer labels (nnU-Net's layout).
            ignore_label: label excluded like the background, or None.

        Returns:
            The state; :meth:`ece_from_state` turns a sum of such states into the ECE.
        """
        labels = target[:, 0].long()
        foreground = labels != 0
        if ignore_label is not None:
            foreground &= labels != ignore_label
        confidence, predicted = torch.softmax(logits.float(), dim=1).max(dim=1)
        confidence, correct = confidence[foreground], (predicted == labels)[foreground]
        bins = bin_index(confidence, self.n_bins)
        sums = [torch.bincount(bins, weights=w, minlength=self.n_bins)
                for w in (torch.ones_like(confidence, dtype=torch.float64), confidence.double(), correct.double())]
        return torch.cat(sums).cpu().numpy()

    def ece_from_state(self, state: np.ndarray) -> float:
        """ECE of summed batch states (NaN when no foreground voxel was seen)."""
        count, confidence, correct = np.asarray(state, dtype=np.float64).reshape(3, self.n_bins)
        n = count.sum()
        return float(np.abs(correct - confidence).sum() / n) if n > 0 else float("nan")

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
