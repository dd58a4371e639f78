"""Loss registry: one name per loss family, used by the trainers and the CLI."""

from __future__ import annotations

from typing import Any

from .base import SegmentationLoss
from .ce import CELoss
from .entropy import EntropyPenaltyLoss
from .focal import FocalLoss
from .label_smoothing import LabelSmoothingLoss
from .margin import MbLSDiceLoss, MbLSLoss
from .regions import NO_REGION_FORM, REGION_LOSSES, RegionLoss
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


def build_region_loss(name: str, **kwargs: Any) -> RegionLoss:
    """The sigmoid form of loss ``name`` for region-based datasets (:data:`~nnunet_mbls.losses.regions.REGION_LOSSES`).

    Args:
        name: a key of :data:`LOSSES` that has a sigmoid form (``ce``, ``focal``, ``ls``, ``mbls``, ``mbls_dice``).
        **kwargs: as :func:`build_loss`.

    Raises:
        ValueError: ``name`` has no sigmoid form (the message says why and names those that have one), is
            unknown, or a hyper-parameter is invalid.
    """
    if name in NO_REGION_FORM:
        raise ValueError(f"loss {name!r} has no sigmoid form for region-based datasets ({NO_REGION_FORM[name]}); "
                         f"those with one: {sorted(REGION_LOSSES)}")
    if name not in REGION_LOSSES:
        raise ValueError(f"loss name {name!r} is unknown; choose one of {sorted(REGION_LOSSES)}")
    return REGION_LOSSES[name](**kwargs)
