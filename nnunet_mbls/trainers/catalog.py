"""The trainers as data: name, loss and hyper-parameters, readable without importing torch or nnU-Net.

This is the one source of truth: each trainer class in :mod:`nnunet_mbls.trainers.variants` takes its
``loss_name`` and ``loss_kwargs`` from here (:func:`loss_of`), and ``nnunet-mbls trainers`` prints this table
without building the classes (which would import nnU-Net and torch). ``tests/trainers/test_catalog.py`` checks that
the catalog, the classes and the loss registry agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: loss name (key of ``nnunet_mbls.losses.LOSSES``) -> the name of its class there
LOSS_CLASS_NAMES = {
    "ce": "CELoss",
    "focal": "FocalLoss",
    "ls": "LabelSmoothingLoss",
    "ecp": "EntropyPenaltyLoss",
    "svls": "SVLSLoss",
    "nacl": "NACLLoss",
    "mbls": "MbLSLoss",
    "mbls_dice": "MbLSDiceLoss",
}


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer: its class name, loss (registry name) and the loss's hyper-parameters."""

    name: str
    loss_name: str
    loss_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def loss_class_name(self) -> str:
        return LOSS_CLASS_NAMES[self.loss_name]


def _margin_sweep(margin: float) -> TrainerSpec:
    return TrainerSpec(f"nnUNetTrainerMbLS_m{margin:g}", "mbls", {"margin": margin, "lam": 0.1})


#: every trainer users can pass to ``nnUNetv2_train -tr``, in the order they are defined in ``variants``
CATALOG: tuple[TrainerSpec, ...] = (
    TrainerSpec("nnUNetTrainerMbLS", "mbls", {"margin": 10.0, "lam": 0.1}),
    TrainerSpec("nnUNetTrainerMbLSDice", "mbls_dice", {"margin": 10.0, "lam": 0.1}),
    TrainerSpec("nnUNetTrainerCE", "ce", {}),
    TrainerSpec("nnUNetTrainerFocal", "focal", {"gamma": 3.0}),
    TrainerSpec("nnUNetTrainerLS", "ls", {"alpha": 0.1}),
    TrainerSpec("nnUNetTrainerECP", "ecp", {"alpha": 0.1}),
    TrainerSpec("nnUNetTrainerSVLS", "svls", {"sigma": 1.0}),
    TrainerSpec("nnUNetTrainerNACL", "nacl", {"alpha": 0.1, "kernel_size": 3}),
    # the margin sweep of the paper (λ = 0.1)
    *(_margin_sweep(m) for m in (0.0, 2.0, 5.0, 8.0, 15.0, 20.0)),
)

BY_NAME = {spec.name: spec for spec in CATALOG}


def loss_of(trainer: str) -> tuple[str, dict[str, Any]]:
    """(loss_name, loss_kwargs) of a trainer of the catalog (a fresh dict: classes do not share it)."""
    spec = BY_NAME[trainer]
    return spec.loss_name, dict(spec.loss_kwargs)
