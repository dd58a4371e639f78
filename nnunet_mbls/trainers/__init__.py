"""nnUNetTrainer subclasses; nnU-Net finds them through nnUNet_extTrainer (see ``nnunet-mbls env``)."""

from . import variants
from .base import nnUNetTrainerCalibrated
from .variants import *  # noqa: F401,F403

#: every trainer users can pass to ``nnUNetv2_train -tr``, in the order they are defined
TRAINERS = [
    cls
    for cls in vars(variants).values()
    if isinstance(cls, type) and issubclass(cls, nnUNetTrainerCalibrated) and cls is not nnUNetTrainerCalibrated
]

__all__ = [cls.__name__ for cls in TRAINERS] + ["nnUNetTrainerCalibrated", "TRAINERS"]
