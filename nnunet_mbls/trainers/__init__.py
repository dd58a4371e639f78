"""nnUNetTrainer subclasses; nnU-Net finds them through nnUNet_extTrainer (see ``nnunet-mbls env``).

The names below are resolved on first use (PEP 562), so importing this package, or its light
:mod:`.catalog` (what ``nnunet-mbls trainers`` prints), imports neither nnU-Net nor torch; the first use of
a trainer class, ``TRAINERS`` or ``from nnunet_mbls.trainers import *`` imports them.
"""

from __future__ import annotations

import importlib

from .catalog import CATALOG

__all__ = [spec.name for spec in CATALOG] + ["nnUNetTrainerCalibrated", "TRAINERS"]
_SUBMODULES = ("base", "catalog", "online_ece", "variants")


def _trainers() -> list:
    """Every trainer users can pass to ``nnUNetv2_train -tr``, in the order they are defined."""
    from . import variants
    from .base import nnUNetTrainerCalibrated

    return [
        cls
        for cls in vars(variants).values()
        if isinstance(cls, type) and issubclass(cls, nnUNetTrainerCalibrated) and cls is not nnUNetTrainerCalibrated
    ]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name == "TRAINERS":
        value = _trainers()
    elif name == "nnUNetTrainerCalibrated":
        from .base import nnUNetTrainerCalibrated as value
    else:
        from . import variants

        value = getattr(variants, name)
    globals()[name] = value
    return value
