"""Temperature scaling: fit a scalar T and apply it to probabilities.

For probabilities p = softmax(z), ``normalize(p ** (1/T)) == softmax(z / T)``, so a T fitted on saved
validation probabilities applies equally to .npz files (:func:`apply_temperature`) and to the network
(:func:`~nnunet_mbls.calibration.checkpoint.fold_temperature_into_checkpoint`, dividing the last linear
segmentation head by T). The voxel subsample T is fitted on: :mod:`nnunet_mbls.calibration.subsample`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration._inputs import CHUNK_VOXELS, as_tensor, check_labels, check_probs
from nnunet_mbls.calibration.metrics import NLL_FLOOR
from nnunet_mbls.defaults import T_BOUNDS

LOG_FLOOR = math.log(NLL_FLOOR)  #: log-probabilities are floored here in the fit (same floor as the NLL metric)
_ROWS_PER_CHUNK = 2**16  # (rows, C) temporaries stay in cache


def _check_temperature(T: float) -> float:
    is_number = isinstance(T, (int, float, np.floating, np.integer)) and not isinstance(T, bool)
    if not is_number or not math.isfinite(T) or T <= 0:
        raise ValueError(f"T must be a finite number > 0, got {T!r}; use a value from fit_temperature")
    return float(T)


def _nll_derivatives(x: Tensor, xt: Tensor, beta: float) -> tuple[float, float, float]:
    """Mean NLL of softmax(beta * x) and its first and second derivative in beta.

    x: (N, C) log-probabilities, xt: (N,) log-probability of the target. With q = softmax(beta x):
    NLL = logsumexp(beta x) - beta x_t, dNLL = E_q[x] - x_t, d2NLL = Var_q[x] >= 0 (convex in beta).
    """
    nll = grad = hess = 0.0
    for s in range(0, x.shape[0], _ROWS_PER_CHUNK):
        xc, tc = x[s : s + _ROWS_PER_CHUNK], xt[s : s + _ROWS_PER_CHUNK]
        z = xc * beta
        lse = torch.logsumexp(z, dim=1)
        q = torch.exp(z - lse[:, None])
        ex = (q * xc).sum(dim=1)
        nll += float((lse - beta * tc).sum(dtype=torch.float64))
        grad += float((ex - tc).sum(dtype=torch.float64))
        hess += float((q * (xc - ex[:, None]).square()).sum(dtype=torch.float64))
    n = x.shape[0]
    return nll / n, grad / n, hess / n


def fit_temperature(
    log_probs: Tensor | np.ndarray, target: Tensor | np.ndarray, t_bounds: tuple[float, float] = T_BOUNDS
) -> float:
    """Scalar T in ``t_bounds`` minimising the mean NLL of softmax(log_probs / T).

    Args:
        log_probs: (N, C) log-probabilities (e.g. log of saved probabilities, -inf allowed for p = 0) or logits.
            They are renormalised with log_softmax and floored at log(1e-12), the NLL metric's floor, so a
            voxel whose target probability is exactly 0 costs a bounded amount instead of infinity.
        target: (N,) integer labels in [0, C).
        t_bounds: (T_min, T_max), 0 < T_min < T_max (default :data:`nnunet_mbls.defaults.T_BOUNDS`).

    The NLL is convex in beta = 1/T; this runs safeguarded Newton on beta (bisection in log beta whenever
    a Newton step leaves the bracket), float32 elementwise work with float64 sums, in row chunks.

    Returns:
        T as a float in [T_min, T_max]. Degenerate inputs return a bound: when every voxel is already correct
        the NLL keeps falling as T shrinks, so T_min is returned; when the NLL is flat in T (e.g. C = 1) 1.0
        (clipped to the bounds).

    Raises:
        ValueError: ``t_bounds`` is not 0 < T_min < T_max < inf; an input is neither a tensor nor a numpy
            array; ``log_probs`` is not a float (N, C) array with N >= 1, or holds NaN, +Inf or a row that is
            -Inf everywhere; ``target`` is not integer labels of shape (N,), or holds a label outside [0, C).
    """
    t_lo, t_hi = (float(v) for v in t_bounds)
    if not (0 < t_lo < t_hi and math.isfinite(t_hi)):
        raise ValueError(f"t_bounds must be (T_min, T_max) with 0 < T_min < T_max < inf, got {t_bounds!r}")
    x, t = as_tensor(log_probs, "log_probs"), as_tensor(target, "target")
    if x.ndim != 2 or not x.is_floating_point() or x.shape[0] == 0:
        raise ValueError(
            f"log_probs must be a float (N, C) tensor with N >= 1, got shape {tuple(x.shape)} dtype {x.dtype}"
        )
    if tuple(t.shape) != (x.shape[0],) or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(
            f"target must be integer labels of shape ({x.shape[0]},), got shape {tuple(t.shape)} dtype {t.dtype}"
        )
    if bool(torch.isnan(x).any()) or bool((x == math.inf).any()) or not bool(torch.isfinite(x.max(dim=1).values).all()):
        raise ValueError("log_probs contain NaN, +Inf or a row that is -Inf everywhere; check the probabilities")
    t = t.to(x.device).long()
    check_labels(t, x.shape[1])
    x = torch.log_softmax(x.float(), dim=1).clamp_(min=LOG_FLOOR)
    xt = x.gather(1, t[:, None]).squeeze(1)

    b_lo, b_hi = 1.0 / t_hi, 1.0 / t_lo
    g_lo, g_hi = _nll_derivatives(x, xt, b_lo)[1], _nll_derivatives(x, xt, b_hi)[1]
    if g_lo >= 0 and g_hi <= 0:  # flat objective: any T is optimal, keep the probabilities as they are
        return min(max(1.0, t_lo), t_hi)
    if g_lo >= 0:
        return t_hi
    if g_hi <= 0:
        return t_lo
    beta = min(max(1.0, b_lo), b_hi)
    for _ in range(100):
        _, g, h = _nll_derivatives(x, xt, beta)
        if g == 0:
            break
        if g > 0:
            b_hi = beta
        else:
            b_lo = beta
        step = beta - g / h if h > 0 else math.nan
        new = step if b_lo < step < b_hi else math.sqrt(b_lo * b_hi)
        if abs(new - beta) <= 1e-7 * beta or b_hi - b_lo <= 1e-9 * b_hi:
            beta = new
            break
        beta = new
    return 1.0 / beta


def apply_temperature(probs: Tensor | np.ndarray, T: float) -> Tensor | np.ndarray:
    """normalize(p ** (1/T)) over the class axis, computed as softmax(log p / T).

    Works chunk by chunk (float32, or float64 for float64 input); the input is not modified.

    Args:
        probs: (C, *spatial) probabilities (e.g. an nnU-Net .npz ``probabilities`` array), tensor or numpy.
        T: temperature > 0; T > 1 softens, T < 1 sharpens, argmax is unchanged and p = 0 stays 0.

    Returns:
        The scaled probabilities: same type, dtype and shape as ``probs``.

    Raises:
        ValueError: ``T`` is not a finite number > 0; ``probs`` is neither a tensor nor a numpy array, not
            floating point, or 0-d; ``probs`` holds NaN/Inf or values outside [0, 1].
    """
    T = _check_temperature(T)
    is_numpy = isinstance(probs, np.ndarray)
    p = as_tensor(probs, "probs")
    if not p.is_floating_point() or p.ndim < 1:
        raise ValueError(f"probs must be a floating (C, *spatial) array, got dtype {p.dtype} shape {tuple(p.shape)}")
    flat = p.reshape(p.shape[0], -1)
    out = torch.empty_like(flat)
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    for s in range(0, flat.shape[1], CHUNK_VOXELS):
        chunk = flat[:, s : s + CHUNK_VOXELS].to(dtype)
        check_probs(chunk)
        out[:, s : s + CHUNK_VOXELS] = torch.softmax(torch.log(chunk) / T, dim=0).to(p.dtype)
    out = out.view(p.shape)
    return out.numpy() if is_numpy else out


#: names that moved to their own modules, still importable from here
_MOVED = {"fold_temperature_into_checkpoint": "checkpoint", "fold_logit_affine_into_checkpoint": "checkpoint",
          "VoxelSubsampler": "subsample", "SubsampleCandidates": "subsample", "case_candidates": "subsample",
          "case_seed": "subsample"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"nnunet_mbls.calibration.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
