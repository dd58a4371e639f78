"""nnUNetTrainer subclasses; nnU-Net finds them through nnUNet_extTrainer (see ``nnunet-mbls env``)."""

from .base import nnUNetTrainerCalibrated
from .variants import (
    nnUNetTrainerCE,
    nnUNetTrainerECP,
    nnUNetTrainerFocal,
    nnUNetTrainerLS,
    nnUNetTrainerMbLS,
    nnUNetTrainerMbLS_m0,
    nnUNetTrainerMbLS_m2,
    nnUNetTrainerMbLS_m5,
    nnUNetTrainerMbLS_m8,
    nnUNetTrainerMbLS_m15,
    nnUNetTrainerMbLS_m20,
    nnUNetTrainerMbLSDice,
    nnUNetTrainerNACL,
    nnUNetTrainerSVLS,
)

#: every trainer users can pass to ``nnUNetv2_train -tr``, in display order
TRAINERS = [
    nnUNetTrainerMbLS,
    nnUNetTrainerMbLSDice,
    nnUNetTrainerCE,
    nnUNetTrainerFocal,
    nnUNetTrainerLS,
    nnUNetTrainerECP,
    nnUNetTrainerSVLS,
    nnUNetTrainerNACL,
    nnUNetTrainerMbLS_m0,
    nnUNetTrainerMbLS_m2,
    nnUNetTrainerMbLS_m5,
    nnUNetTrainerMbLS_m8,
    nnUNetTrainerMbLS_m15,
    nnUNetTrainerMbLS_m20,
]

__all__ = [cls.__name__ for cls in TRAINERS] + ["nnUNetTrainerCalibrated", "TRAINERS"]
