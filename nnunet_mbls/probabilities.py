"""nnU-Net probability files (``.npz`` + ``.pkl``): reading them, and the one check every command applies.

``nnUNetv2_train --npz`` and ``nnUNetv2_predict --save_probabilities`` write ``<case>.npz`` holding
``probabilities`` (C, *spatial) float32 and ``<case>.pkl`` with nnU-Net's properties. ``evaluate``,
``calibrate``, ``apply-temperature`` and ``maps`` read them through :func:`load_probabilities` and
:func:`check_probabilities`, before they write anything, so one bad file gets the same one-line error
from every command.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .errors import InputError

#: largest accepted deviation of a voxel's class probabilities from a sum of 1 (and above 1 for one value)
PROBABILITY_SUM_TOLERANCE = 1e-3


class ProbabilityFileError(InputError):
    """A probability file cannot be used; the message names the case, the file and the fix."""


def load_probabilities(case: str, npz_file: Path) -> tuple[np.ndarray, dict]:
    """Read one nnU-Net probability file and the properties beside it.

    Args:
        case: the case name, for messages.
        npz_file: ``<case>.npz`` holding ``probabilities``; ``<case>.pkl`` next to it is read when present.

    Returns:
        (C, *spatial) float32 probabilities and the nnU-Net properties (empty dict without a .pkl).

    Raises:
        ProbabilityFileError: the file cannot be read, has no ``probabilities`` array, or its ``.pkl`` is broken.
    """
    npz_file = Path(npz_file)
    try:
        with np.load(npz_file) as data:
            if "probabilities" not in data:
                raise ProbabilityFileError(f"case {case}: {npz_file} has no 'probabilities' array (keys {list(data)}); "
                                           f"pass .npz files written by nnUNetv2_predict --save_probabilities")
            probs = data["probabilities"].astype(np.float32, copy=False)
    except ProbabilityFileError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError, KeyError ...: all mean a broken file
        raise ProbabilityFileError(
            f"case {case}: cannot read {npz_file} ({type(e).__name__}: {e}); the file is corrupt, truncated or not "
            f"an npz: rerun the prediction for this case"
        ) from e
    properties = {}
    pkl = npz_file.with_suffix(".pkl")
    if pkl.is_file():
        try:
            with open(pkl, "rb") as f:
                properties = pickle.load(f)
        except Exception as e:
            raise ProbabilityFileError(
                f"case {case}: cannot read {pkl} ({type(e).__name__}: {e}); the file is corrupt or truncated: "
                f"rerun the prediction for this case"
            ) from e
    return probs, properties


def check_probabilities(case: str, probs: np.ndarray, num_classes: int | None = None,
                        spatial_shape: tuple[int, ...] | None = None, shape_source: str = "the reference") -> None:
    """Raise :class:`ProbabilityFileError` unless ``probs`` (C, *spatial) are softmax probabilities of the expected shape.

    Args:
        case: the case name, for the message.
        probs: (C, *spatial) probabilities.
        num_classes: expected C (the labels of dataset.json), or None to skip.
        spatial_shape: expected spatial shape, or None to skip.
        shape_source: what ``spatial_shape`` comes from, for the message.

    Raises:
        ProbabilityFileError: ``probs`` has no class axis, another spatial shape or number of classes than
            expected, NaN/Inf, values outside [0, 1] (above by more than :data:`PROBABILITY_SUM_TOLERANCE`), or
            a voxel whose probabilities do not sum to 1 within that tolerance.
    """
    if probs.ndim < 2:
        raise ProbabilityFileError(f"case {case}: probabilities have shape {probs.shape}; expected (C, *spatial)")
    if spatial_shape is not None and tuple(probs.shape[1:]) != tuple(spatial_shape):
        raise ProbabilityFileError(
            f"case {case}: probabilities have spatial shape {tuple(probs.shape[1:])} but {shape_source} has "
            f"{tuple(spatial_shape)}; pass the files of the same prediction")
    if num_classes is not None and probs.shape[0] != num_classes:
        raise ProbabilityFileError(
            f"case {case}: probabilities have {probs.shape[0]} channels but dataset.json has {num_classes} labels; "
            f"pass the dataset.json of the model that wrote them")
    if not np.isfinite(probs).all():
        raise ProbabilityFileError(f"case {case}: probabilities contain NaN or Inf; rerun the prediction for this case")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0 or hi > 1 + PROBABILITY_SUM_TOLERANCE:
        raise ProbabilityFileError(
            f"case {case}: probabilities lie in [{lo:.4g}, {hi:.4g}], outside [0, 1]; pass softmax probabilities, "
            f"not logits")
    worst = float(np.abs(probs.sum(0, dtype=np.float64) - 1).max())
    if worst > PROBABILITY_SUM_TOLERANCE:
        raise ProbabilityFileError(
            f"case {case}: probabilities do not sum to 1 over classes (largest deviation {worst:.3g}); "
            f"pass softmax probabilities, not logits or sigmoid outputs")
