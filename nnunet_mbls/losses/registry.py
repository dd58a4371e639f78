"""Loss registry: one name per loss family, used by the trainers and the CLI."""

from __future__ import annotations

from typing import Any

from .base import SegmentationLoss
from .ce import CELoss
from .entropy import EntropyPenaltyLoss
from .focal import FocalLoss
from .label_smoothing import LabelSmoothingLoss
from .margin import MbLSDiceLoss, MbLSLoss
from .spatial import NACLLoss, SVLSLoss

LOSSES: dict[str, type[SegmentationLoss]] = {
    "ce": CELoss,
    "focal": FocalLoss,
    "ls": LabelSmoothingLoss,
    "ecp": EntropyPenaltyLoss,
    "svls": SVLSLoss,
    "nacl": NACLLoss,
    "mbls": MbLSLoss,
    "mbls_dice": MbLSDiceLoss,
}

#: losses that wrap nnU-Net's Dice and therefore take nnU-Net's batch_dice/ddp flags
USES_NNUNET_DICE = frozenset({"mbls_dice"})


def build_loss(name: str, **kwargs: Any) -> SegmentationLoss:
    """Instantiate the loss registered under ``name`` in :data:`LOSSES`.

    Args:
        name: one of ``ce``, ``focal``, ``ls``, ``ecp``, ``svls``, ``nacl``, ``mbls``, ``mbls_dice``.
        **kwargs: keyword arguments of that loss's constructor (hyper-parameters, ``ignore_label``; for the
            losses in :data:`USES_NNUNET_DICE` also ``batch_dice`` and ``ddp``).

    Returns:
        The loss module.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names), or a hyper-parameter is
            invalid (raised by the loss's constructor).
    """
    if name not in LOSSES:
        raise ValueError(f"loss name {name!r} is unknown; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
