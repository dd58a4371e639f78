"""nnunet_mbls.calibration.vector: vector scaling's fit recovers a known per-class map, and cross-validation over
cases guards against over-fitting."""

from __future__ import annotations

import pytest
import torch

from nnunet_mbls.calibration.vector import choose_vector_or_temperature, fit_vector_scaling, vector_nll


def sample(scale, bias, cases: int, per_case: int, seed: int):
    """Logits z ~ N(0, 3²) and labels drawn from softmax(scale * z + bias): the true map is known."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(cases * per_case, len(scale), generator=g, dtype=torch.float64) * 3
    p = torch.softmax(z * torch.tensor(scale) + torch.tensor(bias), dim=1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    return z.float(), y, torch.arange(cases).repeat_interleave(per_case)


def test_fit_recovers_a_known_per_class_map():
    scale, bias = [0.5, 1.0, 0.25, 0.8], [0.0, 1.0, -0.5, 0.3]
    z, y, _ = sample(scale, bias, 1, 200_000, seed=0)
    a, b = fit_vector_scaling(z, y)
    torch.testing.assert_close(a, torch.tensor(scale, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(b, torch.tensor(bias, dtype=torch.float64), atol=0.03, rtol=0)
    assert vector_nll(z, y, a, b) <= vector_nll(z, y, torch.tensor(scale), torch.tensor(bias)) + 1e-9


def test_cross_validation_keeps_temperature_when_the_truth_is_a_temperature():
    z, y, groups = sample([0.5] * 4, [0.0] * 4, cases=5, per_case=150, seed=1)  # few voxels: 7 parameters over-fit
    choice = choose_vector_or_temperature(z, y, groups)
    assert choice["chosen"] == "temperature" and "does not beat temperature" in choice["reason"]
    assert choice["cv_nll"]["vector"] >= choice["cv_nll"]["temperature"] and choice["splits"] == 5


def test_cross_validation_picks_vector_when_classes_need_their_own_scale():
    z, y, groups = sample([0.2, 1.5, 0.6], [0.0, 2.0, -1.0], cases=6, per_case=3000, seed=2)
    choice = choose_vector_or_temperature(z, y, groups)
    assert choice["chosen"] == "vector" and choice["cv_nll"]["vector"] < choice["cv_nll"]["temperature"]


def test_one_case_cannot_be_cross_validated():
    z, y, groups = sample([1.0] * 3, [0.0] * 3, cases=1, per_case=500, seed=3)
    assert choose_vector_or_temperature(z, y, groups)["chosen"] == "temperature"


def test_vector_scaling_keeps_its_parameters_within_the_bounds():
    """A class whose logit carries no information: unbounded, its scale runs towards 0 (and on a real two-epoch test
    model L-BFGS ran every scale to inf, which made the transformed logits NaN); the fit keeps the scales within the
    temperature bounds and the biases within ±BIAS_BOUND."""
    from nnunet_mbls.calibration.vector import BIAS_BOUND, fit_vector_scaling
    from nnunet_mbls.defaults import T_BOUNDS

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (4000,), generator=g)
    logits = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    logits[torch.arange(4000), target] += 3.0 * (target != 3)
    logits[:, 3] *= 10  # class 3's logit is loud noise whatever the label: the best scale for it is 0
    scale, bias = fit_vector_scaling(logits, target)
    assert torch.isfinite(scale).all() and torch.isfinite(bias).all() and bias.abs().max() <= BIAS_BOUND
    assert scale.min() >= 1 / T_BOUNDS[1] - 1e-12 and scale.max() <= 1 / T_BOUNDS[0] + 1e-12
    assert scale[3] == pytest.approx(1 / T_BOUNDS[1])  # at its bound: the unbounded fit goes below it
