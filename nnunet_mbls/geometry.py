"""nnU-Net case properties in the axis order of the images the user has.

nnU-Net's preprocessor transposes every case by the plans' ``transpose_forward`` (largest-spacing axis
first) and only then crops it to the nonzero box, so ``shape_before_cropping`` and
``bbox_used_for_cropping`` in a case's properties (``.pkl``) are in the TRANSPOSED axis order. Reference
segmentations, exported segmentations and ``.npz`` probabilities are in the original order: the export
reverts the crop, then applies ``transpose_backward``. Every consumer of those properties (regions,
evaluation, the temperature-fit subsample, map writers) goes through :func:`crop_box`.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError

PLANS_FILE = "plans.json"


class GeometryError(InputError):
    """Case properties that do not fit the reference image; the message names what to pass."""


def transpose_forward_of(plans: Mapping | str | os.PathLike) -> tuple[int, ...]:
    """The plans' ``transpose_forward``.

    Args:
        plans: nnU-Net's plans as a mapping, or the path of a ``plans.json``.

    Returns:
        The permutation, one int per spatial axis.

    Raises:
        GeometryError: the file cannot be read or parsed, the plans have no valid ``transpose_forward``, or
            it is not a permutation.
    """
    if not isinstance(plans, Mapping):
        path = Path(plans)
        try:
            plans = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise GeometryError(f"cannot read the plans file {path} ({e}); pass the plans.json of the model") from e
    try:
        order = tuple(int(i) for i in plans["transpose_forward"])
    except (KeyError, TypeError, ValueError) as e:
        raise GeometryError("the plans have no valid 'transpose_forward'; pass nnU-Net's plans.json of the model") from e
    if sorted(order) != list(range(len(order))):
        raise GeometryError(f"transpose_forward {list(order)} is not a permutation; pass nnU-Net's plans.json")
    return order


def find_plans_file(*folders: str | os.PathLike) -> Path | None:
    """The first ``plans.json`` in ``folders``.

    nnUNetv2_predict writes one into its output folder; a trainer folder holds one above ``fold_k/validation``.

    Args:
        *folders: the folders to look in, in order.

    Returns:
        The path of the first ``plans.json`` found, or None.
    """
    for folder in folders:
        candidate = Path(folder) / PLANS_FILE
        if candidate.is_file():
            return candidate
    return None


def _to_original_order(axes: Sequence, transpose_forward: Sequence[int]) -> list:
    """Entries per transposed axis -> entries per original axis: original axis transpose_forward[i] = entry i."""
    transpose_backward = np.argsort(transpose_forward)  # as nnU-Net's planner computes it
    return [axes[i] for i in transpose_backward]


def crop_box(
    properties: Mapping, transpose_forward: Sequence[int] | None, reference_shape: Sequence[int]
) -> list[list[int]] | None:
    """nnU-Net's crop box of one case as [start, end) per axis of the reference image (original order).

    Args:
        properties: the case's nnU-Net properties (``.pkl`` next to a ``.npz``); None is returned when
            they carry no ``bbox_used_for_cropping`` (probabilities written by other tools).
        transpose_forward: the plans' ``transpose_forward``. None when the plans are unknown: the
            permutations that map ``shape_before_cropping`` onto ``reference_shape`` are tried, and their
            boxes must agree (else GeometryError asking for the plans).
        reference_shape: spatial shape of the reference segmentation (original order).

    Returns:
        [start, end) per axis of the reference image, or None without ``bbox_used_for_cropping``.

    Raises:
        GeometryError: ``shape_before_cropping`` mapped to the original order is not ``reference_shape`` (the
            properties belong to another image, or the plans to another model); the crop box or
            ``transpose_forward`` has another number of axes than the reference; without plans,
            ``shape_before_cropping`` is missing or no single axis order maps it onto ``reference_shape``.
    """
    box = properties.get("bbox_used_for_cropping")
    if box is None:
        return None
    box = [[int(a), int(b)] for a, b in box]
    reference_shape = tuple(int(s) for s in reference_shape)
    shape = properties.get("shape_before_cropping")
    shape = tuple(int(s) for s in shape) if shape is not None else None
    if len(box) != len(reference_shape):
        raise GeometryError(
            f"bbox_used_for_cropping {box} has {len(box)} axes but the reference image has shape {reference_shape}"
        )
    if transpose_forward is not None:
        order = tuple(int(i) for i in transpose_forward)
        if len(order) != len(box):
            raise GeometryError(f"transpose_forward {list(order)} does not fit the {len(box)}-axis crop box {box}")
        mapped_shape = tuple(_to_original_order(shape, order)) if shape is not None else None
        if mapped_shape is not None and mapped_shape != reference_shape:
            raise GeometryError(
                f"shape_before_cropping {shape} (transposed order) maps to {mapped_shape} with transpose_forward "
                f"{list(order)}, but the reference image has shape {reference_shape}: the properties or the plans "
                f"belong to another image or model; pass the plans.json of the model that wrote these probabilities"
            )
        return _to_original_order(box, order)
    if shape is None:
        raise GeometryError(
            "the case properties have bbox_used_for_cropping but no shape_before_cropping, and no plans were given; "
            "pass the plans.json of the model (-pfile)"
        )
    candidates = {
        tuple(map(tuple, _to_original_order(box, order)))
        for order in itertools.permutations(range(len(box)))
        if tuple(_to_original_order(shape, order)) == reference_shape
    }
    if len(candidates) != 1:
        reason = "no axis order maps" if not candidates else "several axis orders map"
        raise GeometryError(
            f"{reason} shape_before_cropping {shape} onto the reference shape {reference_shape} unambiguously, and no "
            f"plans.json was found next to the probabilities; pass the plans.json of the model (-pfile) so that "
            f"nnU-Net's transpose_forward maps the crop box"
        )
    return [list(axis) for axis in candidates.pop()]


def network_to_original(volume: np.ndarray, properties: Mapping, plans_manager, configuration_manager) -> np.ndarray:
    """Bring a float map of one case from the network grid to the reference image, as nnU-Net exports probabilities.

    nnU-Net's own steps and functions, in its order: resample with the configuration's probability resampling
    to the cropped shape, put the crop back into the full (transposed) image with 0 outside the crop box,
    then ``transpose_backward``. For maps nnU-Net does not export itself (mutual information).

    Args:
        volume: (K, *network grid) float map.
        properties: the case's nnU-Net properties (``spacing``, ``shape_before_cropping``,
            ``shape_after_cropping_and_before_resampling``, ``bbox_used_for_cropping``).
        plans_manager: nnU-Net's ``PlansManager`` of the model.
        configuration_manager: nnU-Net's ``ConfigurationManager`` of the configuration that predicted.

    Returns:
        (K, *reference shape) float32 map, 0 outside the crop box.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    shape = properties["shape_after_cropping_and_before_resampling"]
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing[0], *configuration_manager.spacing]  # 2d configuration of 3D images: slices keep their spacing
    resampled = np.asarray(configuration_manager.resampling_fn_probabilities(volume, shape, current, spacing), np.float32)
    full = np.zeros((volume.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties["bbox_used_for_cropping"])
    return full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])
