"""nnunet_mbls.calibration.temperature: the temperature fit and its application to probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_mbls.calibration import apply_temperature, fit_temperature

from helpers.probabilities import overconfident_data


def nll(logits: torch.Tensor, y: torch.Tensor, T: float) -> float:
    return float(nn.functional.cross_entropy(logits.double() / T, y))


@pytest.mark.parametrize("k", [2.5, 0.6])
def test_fit_recovers_known_temperature(k):
    logits, y = overconfident_data(k, 200_000)
    T = fit_temperature(torch.log_softmax(logits, dim=1), y)
    assert T == pytest.approx(k, rel=0.05)
    # it is the minimiser of the NLL, checked with torch's cross entropy
    assert nll(logits, y, T) < min(nll(logits, y, T * 1.01), nll(logits, y, T / 1.01))


def test_fit_same_from_logits_log_probs_and_numpy():
    logits, y = overconfident_data(1.7, 20_000, c=3, seed=1)
    reference = fit_temperature(logits, y)
    assert fit_temperature(torch.log(torch.softmax(logits, 1)), y) == pytest.approx(reference, rel=1e-5)
    assert fit_temperature(torch.log_softmax(logits, 1).numpy(), y.numpy()) == pytest.approx(reference, rel=1e-5)


def test_fit_degenerate_inputs_return_finite_bounds():
    log_p = torch.log(torch.tensor([[0.9, 0.05, 0.05]])).repeat(500, 1)
    all_correct = torch.zeros(500, dtype=torch.long)
    assert fit_temperature(log_p, all_correct) == 0.05  # NLL keeps falling as T shrinks: lower bound
    assert fit_temperature(log_p, all_correct, t_bounds=(0.2, 5.0)) == 0.2
    saturated = torch.log(torch.tensor([[1.0, 0.0]])).repeat(10, 1)  # -inf entries, p_target = 1
    assert fit_temperature(saturated, torch.zeros(10, dtype=torch.long)) == 0.05
    one_class = torch.zeros(100, 1)
    assert fit_temperature(one_class, torch.zeros(100, dtype=torch.long)) == 1.0  # flat NLL: keep T = 1
    all_wrong = torch.log(torch.tensor([[0.98, 0.02]])).repeat(10, 1)
    T = fit_temperature(all_wrong, torch.ones(10, dtype=torch.long))
    assert math.isfinite(T) and T == 20.0  # wants uniform probabilities: upper bound


def test_fit_rejects_bad_input():
    logits, y = overconfident_data(1.0, 10, c=2)
    with pytest.raises(ValueError, match="t_bounds"):
        fit_temperature(logits, y, t_bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((10, 2), float("nan")), y)
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        fit_temperature(logits, torch.full((10,), 5))
    with pytest.raises(ValueError, match=r"shape \(9,\)"):
        fit_temperature(logits, y[:9])


def test_apply_temperature_equals_softmax_of_scaled_log_probs():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(3, 6, 7, 5, generator=g) * 3, dim=0)
    probs[:, 0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # like nnU-Net outside the crop box
    for T in (0.5, 2.0):
        out = apply_temperature(probs, T)
        expected = torch.softmax(torch.log(probs.double()) / T, dim=0).float()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(out.argmax(0), probs.argmax(0))
        assert torch.equal(out[:, 0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # p = 0 stays 0
    as_numpy = apply_temperature(probs.numpy(), 2.0)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_allclose(as_numpy, apply_temperature(probs, 2.0).numpy(), rtol=1e-6)
    torch.testing.assert_close(apply_temperature(probs, 1.0), probs)
    assert apply_temperature(probs.double(), 3.0).dtype == torch.float64
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="T must be a finite number > 0"):
            apply_temperature(probs, bad)


def test_apply_temperature_matches_scaled_logits():
    """normalize(p ** (1/T)) == softmax(z / T), the identity folding relies on."""
    logits, _ = overconfident_data(1.0, 1000, c=5, seed=3)
    probs = torch.softmax(logits.double(), dim=1).T  # (C, N)
    torch.testing.assert_close(apply_temperature(probs, 1.8), torch.softmax(logits.double() / 1.8, dim=1).T)
