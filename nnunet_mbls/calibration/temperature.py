"""Temperature scaling: fit a scalar T, apply it to saved probabilities, or fold it into a checkpoint.

For probabilities p = softmax(z), ``normalize(p ** (1/T)) == softmax(z / T)``, so a T fitted on saved
validation probabilities applies equally to .npz files (:func:`apply_temperature`) and to the network
(:func:`fold_temperature_into_checkpoint`, dividing the last linear segmentation head by T).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from nnunet_mbls.calibration._inputs import (
    CHUNK_VOXELS,
    as_tensor,
    check_labels,
    check_positive_int,
    check_probs,
    flatten_case,
    iter_chunks,
)
from nnunet_mbls.calibration.metrics import NLL_FLOOR
from nnunet_mbls.io import atomic_write, file_sha256

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
    log_probs: Tensor | np.ndarray, target: Tensor | np.ndarray, t_bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Scalar T in ``t_bounds`` minimising the mean NLL of softmax(log_probs / T).

    Args:
        log_probs: (N, C) log-probabilities (e.g. log of saved probabilities, -inf allowed for p = 0) or logits.
            They are renormalised with log_softmax and floored at log(1e-12), the NLL metric's floor, so a
            voxel whose target probability is exactly 0 costs a bounded amount instead of infinity.
        target: (N,) integer labels in [0, C).
        t_bounds: (T_min, T_max), 0 < T_min < T_max.

    The NLL is convex in beta = 1/T; this runs safeguarded Newton on beta (bisection in log beta whenever
    a Newton step leaves the bracket), float32 elementwise work with float64 sums, in row chunks.
    Degenerate inputs return a bound: when every voxel is already correct the NLL keeps falling as T
    shrinks, so T_min is returned; when the NLL is flat in T (e.g. C = 1) 1.0 (clipped to the bounds).
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


class VoxelSubsampler:
    """Bounded uniform sample of voxels across many cases streamed one by one, for :func:`fit_temperature`.

    Bottom-k ("priority") reservoir sampling: every included voxel gets a uniform random key from a
    generator seeded with ``seed``, and the ``max_voxels`` voxels with the smallest keys are kept. The
    result is a uniform sample without replacement of all voxels seen so far (so large cases contribute
    proportionally more, as in a pooled fit), deterministic for a seed and the same sequence of ``add``
    calls. Candidates are merged lazily: a voxel enters only if its key is below the ``max_voxels``-th
    smallest key at the last merge, and the smallest ``max_voxels`` are selected again only when twice
    that many rows are held (and by :meth:`arrays`), so a long stream costs few selections.
    Memory: at most 2 x max_voxels x (C float32 + int64 label + float64 key), plus one chunk of a case.
    """

    def __init__(self, max_voxels: int = 1_000_000, seed: int = 0) -> None:
        self.max_voxels = check_positive_int("max_voxels", max_voxels, 1_000_000)
        self.chunk_voxels = CHUNK_VOXELS
        self.n_seen = 0
        self._gen = torch.Generator().manual_seed(int(seed))
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (keys (n,), log_probs (n, C), target (n,))
        self._rows = 0  # rows held in _parts
        self._threshold = math.inf  # keys must be below it to enter
        self._num_classes: int | None = None

    def __len__(self) -> int:
        return min(self._rows, self.max_voxels)

    def add(
        self, probs: Tensor | np.ndarray, target: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None
    ) -> None:
        """Offer the voxels of one case: probs (C, *spatial), target (*spatial) int, mask (*spatial) bool or None."""
        p_flat, t_flat, m_flat = flatten_case(probs, target, mask)
        if self._num_classes is not None and p_flat.shape[0] != self._num_classes:
            raise ValueError(f"probs has {p_flat.shape[0]} classes but earlier cases had {self._num_classes}; "
                             "use one subsampler per dataset")
        saved = (list(self._parts), self._rows, self._threshold, self.n_seen, self._gen.get_state())
        try:
            for p, t in iter_chunks(p_flat, t_flat, m_flat, self.chunk_voxels):
                self._offer(p, t)
        except BaseException:  # a bad chunk rejects the whole case: restore the sample and the generator
            self._parts, self._rows, self._threshold, self.n_seen = saved[:4]
            self._gen.set_state(saved[4])
            raise
        if self._rows:
            self._num_classes = p_flat.shape[0]

    def _offer(self, p: Tensor, t: Tensor) -> None:
        """Add the candidates of one checked chunk, p (C, n) and t (n,) int64."""
        keys = torch.rand(t.numel(), generator=self._gen, dtype=torch.float64)
        self.n_seen += t.numel()
        index = self._entering(keys)
        if index is not None:
            keys, p, t = keys[index], p.index_select(1, index.to(p.device)), t[index.to(t.device)]
        self._take(keys, p.T.float().log().cpu(), t.cpu())  # log: -inf where p == 0

    def _entering(self, keys: Tensor) -> Tensor | None:
        """Indices of the keys below the max_voxels-th smallest so far (None: all may enter)."""
        return torch.nonzero(keys < self._threshold).squeeze(1) if self._threshold < math.inf else None

    def _take(self, keys: Tensor, logp: Tensor, target: Tensor) -> None:
        """Hold rows (keys (n,) float64, log_probs (n, C), target (n,)); select again when twice max_voxels are held."""
        self._parts.append((keys, logp, target))
        self._rows += keys.numel()
        if self._rows > 2 * self.max_voxels:
            self._merge()

    def _merge(self) -> None:
        """Concatenate the parts; keep the max_voxels rows with the smallest keys (sorted by key) if there are more."""
        keys, logp, target = (torch.cat(columns) for columns in zip(*self._parts))
        if keys.numel() > self.max_voxels:
            index = torch.topk(keys, self.max_voxels, largest=False).indices
            keys, logp, target = keys[index], logp[index], target[index]
            self._threshold = float(keys.max())
        self._parts, self._rows = [(keys, logp, target)], keys.numel()

    def arrays(self) -> tuple[Tensor, Tensor]:
        """Sampled ``log_probs`` (N, C) float32 (log of the given probabilities) and ``target`` (N,) int64."""
        if not self._parts:
            raise ValueError("no voxel was added; call add() with at least one non-empty case first")
        self._merge()
        _, logp, target = self._parts[0]
        return logp, target

    def candidates(self) -> SubsampleCandidates:
        """The rows held (at most ``max_voxels``, sorted by key when more were offered) with their keys, as numpy
        arrays, for :meth:`add_candidates` of another subsampler (e.g. in another process)."""
        if not self._rows:
            c = self._num_classes or 0
            return SubsampleCandidates(np.empty(0), np.empty((0, c), np.float32), np.empty(0, np.int64), self.n_seen)
        self._merge()
        keys, logp, target = self._parts[0]
        return SubsampleCandidates(keys.numpy(), logp.numpy(), target.numpy(), self.n_seen)

    def add_candidates(self, candidates: SubsampleCandidates) -> None:
        """Merge the rows of another subsampler (:meth:`candidates`) with the keys they were drawn with.

        The result is the ``max_voxels`` rows with the smallest keys of everything offered to either, so a
        subsampler per case merged in any order keeps the same voxels as one fed every case (with the same keys).
        """
        keys, logp, target = (torch.as_tensor(a) for a in candidates[:3])
        if keys.ndim != 1 or logp.ndim != 2 or tuple(target.shape) != tuple(keys.shape) or logp.shape[0] != keys.numel():
            raise ValueError(f"candidates must be keys (n,), log_probs (n, C), target (n,), got shapes "
                             f"{tuple(keys.shape)}, {tuple(logp.shape)}, {tuple(target.shape)}")
        self.n_seen += int(candidates.n_seen)
        if not keys.numel():
            return
        if self._num_classes is not None and logp.shape[1] != self._num_classes:
            raise ValueError(f"candidates have {logp.shape[1]} classes but earlier cases had {self._num_classes}; "
                             "use one subsampler per dataset")
        index = self._entering(keys)
        if index is not None:
            keys, logp, target = keys[index], logp[index], target[index]
        self._num_classes = logp.shape[1]
        self._take(keys.to(torch.float64), logp.float(), target.long())


class SubsampleCandidates(NamedTuple):
    """Rows of a :class:`VoxelSubsampler` with their keys: keys (n,) float64, log_probs (n, C) float32, target (n,)
    int64, and n_seen, the number of voxels they were chosen from."""

    keys: np.ndarray
    log_probs: np.ndarray
    target: np.ndarray
    n_seen: int


def case_seed(seed: int, case: str) -> int:
    """The seed of one case's sampling keys: the first 63 bits of sha256("<seed>:<case>").

    Depends on the seed and the case's name only, so a case's keys are the same whichever cases come with it,
    in whatever order, in whichever process (see :func:`case_candidates`)."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{case}".encode()).digest()[:8], "little") >> 1


def case_candidates(case: str, probs: np.ndarray | Tensor, target: np.ndarray | Tensor,
                    mask: np.ndarray | Tensor | None, *, max_voxels: int, seed: int) -> SubsampleCandidates:
    """The candidates of one case for a temperature-fit subsample with per-case keys.

    A :class:`VoxelSubsampler` seeded with :func:`case_seed` ``(seed, case)`` takes the case's voxels (probs (C,
    *spatial), target (*spatial), mask (*spatial) bool or None) and keeps its ``max_voxels`` smallest keys;
    :meth:`VoxelSubsampler.add_candidates` of every case then gives the ``max_voxels`` voxels with the smallest
    keys of all cases: a uniform sample without replacement (the keys of all voxels are i.i.d. uniform),
    deterministic for ``seed`` and the case names, and independent of the order the cases are merged in and of
    the process that computed them. A plain function (picklable) for worker processes, e.g. with
    ``functools.partial(case_candidates, max_voxels=..., seed=...)``.
    """
    subsample = VoxelSubsampler(max_voxels=max_voxels, seed=case_seed(seed, case))
    subsample.add(torch.as_tensor(probs), torch.as_tensor(target), None if mask is None else torch.as_tensor(mask))
    out = subsample.candidates()
    if out.log_probs.shape[1] == 0:  # no voxel: keep the class count for the shape check of add_candidates
        out = out._replace(log_probs=np.empty((0, int(probs.shape[0])), np.float32))
    return out


def apply_temperature(probs: Tensor | np.ndarray, T: float) -> Tensor | np.ndarray:
    """normalize(p ** (1/T)) over the class axis, computed as softmax(log p / T); same type, dtype and shape.

    Args:
        probs: (C, *spatial) probabilities (e.g. an nnU-Net .npz ``probabilities`` array).
        T: temperature > 0; T > 1 softens, T < 1 sharpens, argmax is unchanged and p = 0 stays 0.
    Works chunk by chunk (float32, or float64 for float64 input); the input is not modified.
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


_HEAD_KEY = re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$")


def fold_temperature_into_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, T: float, *, overwrite: bool = False
) -> list[str]:
    """Write a copy of nnU-Net checkpoint ``src`` to ``dst`` whose network outputs logits / T.

    :func:`fold_logit_affine_into_checkpoint` with scale 1/T and bias 0.
    ``checkpoint['mbls_temperature']`` records the total temperature (T times any already recorded).
    """
    T = _check_temperature(T)
    return fold_logit_affine_into_checkpoint(src, dst, 1.0 / T, 0.0, overwrite=overwrite, temperature=T)


def fold_logit_affine_into_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    scale: float | Sequence[float],
    bias: float | Sequence[float] = 0.0,
    *,
    overwrite: bool = False,
    temperature: float | None = None,
) -> list[str]:
    """Write a copy of nnU-Net checkpoint ``src`` to ``dst`` whose network outputs scale ⊙ logits + bias.

    The full-resolution head ``decoder.seg_layers.{i}`` with the highest i is a linear 1×1 convolution
    (logits = W h + b), so class k's weights become scale_k W_k and its bias scale_k b_k + bias_k: zero
    inference cost, unchanged argmax for a common scale and zero bias (temperature scaling). Averaging over
    folds and mirroring commutes with this map, so one map folded into every fold transforms the ensemble.
    Every other weight and all state-dict keys stay as they are, so nnU-Net's predictor loads ``dst``
    strictly under any trainer name (stock ``nnUNetTrainer`` too). The file is for inference: the optimizer
    and grad-scaler states (as large as the weights) are left out; ``checkpoint['mbls_source']`` names the
    trained checkpoint it derives from (file name and SHA-256); ``checkpoint['mbls_logit_affine']``
    records the map (composed with any map ``src`` already had), and ``temperature`` (T times any already
    recorded) goes to ``checkpoint['mbls_temperature']``.

    Args:
        scale, bias: a number, or one value per class (C,); scale > 0.

    Returns the modified state-dict keys. ``src`` is never modified; ``dst`` must differ from it and is
    only replaced when ``overwrite`` is True. Raises ValueError when the checkpoint has no such head.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(
            f"dst {dst} is the source checkpoint; write to another file, e.g. checkpoint_final_calibrated.pth"
        )
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{src} has no 'network_weights' state dict; is it an nnU-Net v2 checkpoint?")
    heads = [(int(m.group(1)), key) for key in weights if (m := _HEAD_KEY.match(key))]
    weight_heads = [i for i, key in heads if key.endswith(".weight")]
    if not weight_heads:
        raise ValueError(
            f"{src} has no keys decoder.seg_layers.{{i}}.weight / .bias (the linear segmentation head); "
            "this architecture cannot take a folded temperature: use apply_temperature on the saved .npz "
            "probabilities instead"
        )
    last = max(weight_heads)
    weight_key, bias_key = f"decoder.seg_layers.{last}.weight", f"decoder.seg_layers.{last}.bias"
    num_classes = weights[weight_key].shape[0]
    a = _per_class("scale", scale, num_classes)
    b = _per_class("bias", bias, num_classes)
    if not bool((a > 0).all()):
        raise ValueError(f"scale must be > 0 for every class, got {a.tolist()}; a fitted scale is positive")
    shape = (num_classes,) + (1,) * (weights[weight_key].ndim - 1)
    weights[weight_key] = weights[weight_key] * a.to(weights[weight_key].dtype).reshape(shape)
    modified = [weight_key]
    if bias_key in weights:
        weights[bias_key] = weights[bias_key] * a.to(weights[bias_key].dtype) + b.to(weights[bias_key].dtype)
        modified.append(bias_key)
    elif bool((b != 0).any()):
        raise ValueError(f"{src}: the segmentation head has no bias, so a nonzero bias cannot be folded into it")
    earlier = checkpoint.get("mbls_logit_affine", {"scale": [1.0] * num_classes, "bias": [0.0] * num_classes})
    a0, b0 = torch.tensor(earlier["scale"], dtype=torch.float64), torch.tensor(earlier["bias"], dtype=torch.float64)
    checkpoint["mbls_logit_affine"] = {"scale": (a * a0).tolist(), "bias": (a * b0 + b).tolist()}
    if temperature is not None:
        checkpoint["mbls_temperature"] = float(checkpoint.get("mbls_temperature", 1.0)) * temperature
    for key in ("optimizer_state", "grad_scaler_state"):
        checkpoint.pop(key, None)
    # the trained checkpoint this file derives from (kept through further folds): what "is calibrated" checks
    checkpoint.setdefault("mbls_source", {"file": src.name, "sha256": file_sha256(src)})
    atomic_write(dst, lambda tmp: torch.save(checkpoint, tmp))
    return modified


def _per_class(name: str, value: float | Sequence[float], num_classes: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(num_classes).clone()
    if t.numel() != num_classes or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be a finite number or {num_classes} finite values (one per class), got {value!r}")
    return t
