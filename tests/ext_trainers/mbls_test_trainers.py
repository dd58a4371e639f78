"""Short trainers for the tests: our trainers (and stock nnUNetTrainer) with a few tiny epochs.

Found by nnU-Net through nnUNet_extTrainer like the real ones; only the budget differs.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_mbls.trainers import nnUNetTrainerCE, nnUNetTrainerFocal, nnUNetTrainerMbLS, nnUNetTrainerMbLSDice


class ShortBudget:
    num_epochs_for_tests = 2
    iterations_for_tests = 3

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.num_epochs_for_tests
        self.num_iterations_per_epoch = self.iterations_for_tests
        self.num_val_iterations_per_epoch = 2


class nnUNetTrainerMbLS_test(ShortBudget, nnUNetTrainerMbLS):
    pass


class nnUNetTrainerMbLSDice_test(ShortBudget, nnUNetTrainerMbLSDice):
    pass


class nnUNetTrainerCE_test(ShortBudget, nnUNetTrainerCE):
    pass


class nnUNetTrainerStock_test(ShortBudget, nnUNetTrainer):
    """Stock nnU-Net Dice+CE with the test budget (no nnunet-mbls code involved)."""


class nnUNetTrainerFocal_resume_test(ShortBudget, nnUNetTrainerFocal):
    """Focal loss with the test budget, checkpoint_latest.pth every epoch and a simulated crash.

    With MBLS_TEST_CRASH_AFTER_EPOCH=k the run stops with an error right after epoch k ended
    (its checkpoint written), like a killed job; ``nnUNetv2_train ... --c`` then resumes it.
    """

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if os.environ.get("MBLS_TEST_CRASH_AFTER_EPOCH") == str(epoch):
            raise RuntimeError(f"simulated crash after epoch {epoch} (MBLS_TEST_CRASH_AFTER_EPOCH)")


class nnUNetTrainerMbLS_badcalib_test(ShortBudget, nnUNetTrainerMbLS):
    """Its calibration step fails after training and validation: a subsample of 0 voxels is refused."""

    calibration_max_voxels = 0


class nnUNetTrainerStockFolds_test(ShortBudget, nnUNetTrainer):
    """Stock nnU-Net with the test budget, for the fold-ensemble calibration tests only."""


class nnUNetTrainerMbLS_bestfirst_test(ShortBudget, nnUNetTrainerMbLS):
    """checkpoint_best.pth stays epoch 0's, so it holds other weights than checkpoint_final.pth (``--val_best`` tests)."""

    def on_epoch_end(self):
        super().on_epoch_end()
        self._best_ema = float("inf")  # no later epoch beats it


class CPUSizedBatch(ShortBudget):
    """At most 2 patches per batch: the residual-encoder presets plan 8 (3d) and 192 (2d) for a GPU."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.configuration_manager.configuration["batch_size"] = min(2, self.configuration_manager.batch_size)


class nnUNetTrainerMbLS_cpubatch_test(CPUSizedBatch, nnUNetTrainerMbLS):
    pass


class nnUNetTrainerMbLS_nomirror_test(ShortBudget, nnUNetTrainerMbLS):
    """Validation without mirroring (8x fewer forward passes): the cascade's larger images on the CPU."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, do_dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, do_dummy_2d, initial_patch_size, None
