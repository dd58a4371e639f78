"""Vector scaling: a per-class scale and bias on the logits, softmax(a ⊙ z + b), fitted by NLL.

Unlike temperature scaling, a per-class map of the logits is not the same map of the log-probabilities
(log p = z − logsumexp z shifts every class by the same per-voxel amount, which a common scale absorbs
but per-class scales do not), so vector scaling is fitted on logits, never on saved probabilities.

With 2C parameters it can over-fit a small validation set, so :func:`choose_vector_or_temperature`
compares the two by cross-validated NLL over CASES (voxels of one case are never split between
fitting and testing) and keeps temperature scaling unless vector scaling beats it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration.temperature import fit_temperature
from nnunet_mbls.defaults import T_BOUNDS

#: cross-validation splits over cases (fewer when there are fewer cases)
CV_SPLITS = 5


def _check_rows(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 2 or not logits.is_floating_point() or logits.shape[0] == 0:
        raise ValueError(f"logits must be a float (N, C) tensor with N >= 1, got shape {tuple(logits.shape)}")
    if tuple(target.shape) != (logits.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be integer labels of shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN/Inf; check the network output")


def vector_nll(logits: Tensor, target: Tensor, scale: Tensor, bias: Tensor) -> float:
    """Mean NLL of softmax(scale ⊙ logits + bias), computed in float64.

    Args:
        logits: (N, C) voxel logits.
        target: (N,) integer labels in [0, C).
        scale: (C,) per-class scale.
        bias: (C,) per-class bias.

    Returns:
        The mean NLL over the N voxels, a float.
    """
    z = logits.double() * scale.double() + bias.double()
    return float(torch.nn.functional.cross_entropy(z, target.long()))


#: bound of each class's bias (logit units): exp(-30) ~ 1e-13 is below the NLL's floor of 1e-12
BIAS_BOUND = 30.0


def fit_vector_scaling(logits: Tensor, target: Tensor, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Fit a per-class scale and bias minimising the mean NLL of softmax(scale ⊙ logits + bias).

    L-BFGS in float64 from temperature scaling's solution (scale 1/T, bias 0); the scale is kept positive
    as exp(log scale), and the bias of class 0 is fixed at 0 (softmax ignores a common shift). The scale is kept
    within the temperature bounds (1/T_max .. 1/T_min) and each bias within ±:data:`BIAS_BOUND`: on separable
    voxels, or with a class absent from them, the NLL keeps falling as they grow, and unbounded they reach inf
    (seen on a two-epoch test model: the transformed logits became NaN).

    Args:
        logits: (N, C) voxel logits (never saved probabilities, see the module docstring).
        target: (N,) integer labels in [0, C).
        max_iter: L-BFGS iterations (default 100).

    Returns:
        ``(scale, bias)``, each (C,) float64; scale > 0, bias[0] = 0.

    Raises:
        ValueError: ``logits`` is not a float (N, C) tensor with N >= 1 or holds NaN/Inf; ``target`` is not
            integer labels of shape (N,) (or, from the temperature fit, holds a label outside [0, C)).
    """
    _check_rows(logits, target)
    z, t = logits.double(), target.long()
    num_classes = z.shape[1]
    temperature = fit_temperature(z, t)
    log_scale = torch.full((num_classes,), -math.log(temperature), dtype=torch.float64, requires_grad=True)
    free_bias = torch.zeros(num_classes - 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale, free_bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    low, high = -math.log(T_BOUNDS[1]), -math.log(T_BOUNDS[0])

    def bounded() -> tuple[Tensor, Tensor]:
        return (log_scale.clamp(low, high).exp(),
                torch.cat([free_bias.new_zeros(1), free_bias.clamp(-BIAS_BOUND, BIAS_BOUND)]))

    def closure() -> Tensor:
        """L-BFGS's closure: the NLL at the current parameters, after its backward pass."""
        optimizer.zero_grad()
        scale, bias = bounded()
        loss = torch.nn.functional.cross_entropy(z * scale + bias, t)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scale, bias = bounded()
        return scale.clone(), bias.clone()


def choose_vector_or_temperature(logits: Tensor, target: Tensor, groups: Tensor) -> dict:
    """Cross-validated NLL of temperature and vector scaling over cases; vector only when it is lower.

    Cases are split into min(:data:`CV_SPLITS`, number of cases) folds in a fixed random order (seed 0); the
    voxels of one case are never split between fitting and testing.

    Args:
        logits: (N, C) voxel logits.
        target: (N,) labels.
        groups: (N,) case index of each voxel.

    Returns:
        A JSON-ready dict: ``chosen`` ("vector" or "temperature"), ``reason``, ``cv_nll`` (the held-out NLL of
        each, voxel-weighted over the splits), ``cases`` and ``splits``. With fewer than 2 cases temperature
        is kept without cross-validation (``splits`` 0, no ``cv_nll``).

    Raises:
        ValueError: ``logits``/``target`` are invalid (see :func:`fit_vector_scaling`).
    """
    _check_rows(logits, target)
    cases = torch.unique(groups)
    if cases.numel() < 2:
        return {"chosen": "temperature", "cases": int(cases.numel()), "splits": 0,
                "reason": "fewer than 2 cases: vector scaling cannot be cross-validated, so temperature scaling is kept"}
    splits = min(CV_SPLITS, int(cases.numel()))
    order = cases[torch.randperm(cases.numel(), generator=torch.Generator().manual_seed(0))]
    held_out = {"temperature": 0.0, "vector": 0.0}
    for k in range(splits):
        test_cases = order[k::splits]
        test = torch.isin(groups, test_cases)
        train = ~test
        T = fit_temperature(logits[train], target[train])
        held_out["temperature"] += vector_nll(logits[test], target[test], torch.full((logits.shape[1],), 1 / T),
                                              torch.zeros(logits.shape[1])) * int(test.sum())
        scale, bias = fit_vector_scaling(logits[train], target[train])
        held_out["vector"] += vector_nll(logits[test], target[test], scale, bias) * int(test.sum())
    nll = {k: v / logits.shape[0] for k, v in held_out.items()}
    chosen = "vector" if nll["vector"] < nll["temperature"] else "temperature"
    reason = (f"cross-validated NLL over {int(cases.numel())} cases ({splits} splits): vector {nll['vector']:.5f} "
              f"{'<' if chosen == 'vector' else '>='} temperature {nll['temperature']:.5f}"
              + ("" if chosen == "vector" else "; vector scaling does not beat temperature scaling, so temperature is kept"))
    return {"chosen": chosen, "reason": reason, "cv_nll": nll, "cases": int(cases.numel()), "splits": splits}


def apply_vector_scaling(logits: np.ndarray | Tensor, scale, bias) -> np.ndarray | Tensor:
    """scale ⊙ logits + bias over the class axis, in float32.

    Args:
        logits: (C, *spatial) logits, numpy or tensor.
        scale: (C,) per-class scale (anything ``torch.as_tensor`` takes).
        bias: (C,) per-class bias (anything ``torch.as_tensor`` takes).

    Returns:
        (C, *spatial) float32 scaled logits, numpy for numpy input, else a tensor.
    """
    is_numpy = isinstance(logits, np.ndarray)
    z = torch.as_tensor(logits).float()
    shape = (z.shape[0],) + (1,) * (z.ndim - 1)
    out = z * torch.as_tensor(scale, dtype=torch.float32).reshape(shape) + torch.as_tensor(bias, dtype=torch.float32).reshape(shape)
    return out.numpy() if is_numpy else out
