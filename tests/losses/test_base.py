"""nnunet_mbls.losses.base: what every loss shares: ignored voxels, half-precision logits computed in float32,
input checks, and hyper-parameter checks naming the argument and the value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_mbls.losses import (
    LOSSES,
    CELoss,
    EntropyPenaltyLoss,
    FocalLoss,
    LabelSmoothingLoss,
    MbLSDiceLoss,
    MbLSLoss,
    NACLLoss,
    SVLSLoss,
    build_loss,
)

from helpers.losses import DEFAULTS, IGNORE, make_inputs


@pytest.mark.parametrize("name", list(LOSSES))
def test_ignored_voxels_get_no_gradient_and_do_not_change_the_loss(name):
    logits, target = make_inputs((5, 6), with_ignore=True, seed=1)
    kwargs = DEFAULTS.get(name, {"margin": 1.0, "lam": 0.3})
    loss = build_loss(name, ignore_label=IGNORE, **kwargs)
    x = logits.float().requires_grad_()
    value = loss(x, target)
    value.backward()
    ignored = (target == IGNORE).expand_as(x)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[ignored] == 0).all()
    assert (x.grad[~ignored] != 0).any()
    # changing the logits of ignored voxels does not change the loss
    y = logits.float().clone()
    y[ignored] = torch.randn(int(ignored.sum())) * 50
    assert loss(y, target).item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_the_float32_value(name, dtype):
    logits, target = make_inputs((6, 5, 4), with_ignore=False, seed=2)
    half = logits.to(dtype)
    loss = build_loss(name, **DEFAULTS.get(name, {}))
    expected = loss(half.float(), target)
    got = loss(half, target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_fp16_logits_are_finite(name):
    logits, target = make_inputs((4, 4), with_ignore=False, seed=3)
    extreme = (torch.sign(logits) * 6e4).half().requires_grad_()
    loss = build_loss(name, **({"margin": 1e4, "lam": 0.1} if name.startswith("mbls") else DEFAULTS.get(name, {})))
    value = loss(extreme, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(extreme.grad.float()).all()
    assert value.item() == pytest.approx(loss(extreme.detach().float(), target).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("margin", [10.0, 1e5], ids=["default_margin", "huge_margin"])
def test_extreme_half_precision_logits_give_finite_float32_values(dtype, margin):
    """±6e4 logits (near fp16's max; the margin penalty of m = 10 is then ~1e5 per voxel): the loss equals the
    float32 loss of the same rounded logits, and no gradient is NaN/Inf, for every loss."""
    from nnunet_mbls.losses import LOSSES, build_loss

    g = torch.Generator().manual_seed(2)
    sign = torch.randn(2, 3, 4, 5, 3, generator=g).sign()
    scale = torch.rand(2, 3, 4, 5, 3, generator=g) * 6e4
    target = torch.randint(0, 3, (2, 1, 4, 5, 3), generator=g)
    for name in LOSSES:
        logits = (sign * scale).to(dtype).requires_grad_()
        assert logits.abs().max().item() > 5e4
        kwargs = {"margin": margin, "lam": 0.1} if name.startswith("mbls") else {}
        loss = build_loss(name, **kwargs)
        value = loss(logits, target)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert torch.isfinite(logits.grad.float()).all(), name
        reference = loss(logits.detach().float(), target)
        assert value.item() == pytest.approx(reference.item(), rel=1e-6), name


def test_losses_do_not_mutate_inputs():
    logits, target = make_inputs((5, 5), with_ignore=True, seed=7)
    logits32 = logits.float()
    before = (logits32.clone(), target.clone())
    for name in LOSSES:
        build_loss(name, ignore_label=IGNORE, **DEFAULTS.get(name, {}))(logits32, target)
    assert torch.equal(before[0], logits32) and torch.equal(before[1], target)


@pytest.mark.parametrize("name", list(LOSSES))
def test_shape_mismatch_raises_value_error(name):
    loss = build_loss(name)
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="target"):
        loss(logits, torch.zeros(2, 1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="1 channel"):
        loss(logits, torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="C >= 2"):
        loss(torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: MbLSLoss(margin=-1), "margin"),
        (lambda: MbLSLoss(lam=-0.1), "lam"),
        (lambda: MbLSDiceLoss(lam=-0.1), "lam"),
        (lambda: FocalLoss(gamma=-1), "gamma"),
        (lambda: LabelSmoothingLoss(alpha=1.0), "alpha"),
        (lambda: LabelSmoothingLoss(alpha=-0.1), "alpha"),
        (lambda: EntropyPenaltyLoss(alpha=1.5), "alpha"),
        (lambda: SVLSLoss(sigma=0), "sigma"),
        (lambda: NACLLoss(kernel_size=4), "kernel_size"),
        (lambda: NACLLoss(kernel_size=1), "kernel_size"),
        (lambda: NACLLoss(alpha=1.0), "alpha"),
        (lambda: CELoss(ignore_label=-1), "ignore_label"),
        (lambda: MbLSLoss(margin=float("nan")), "margin"),
    ],
)
def test_bad_hyper_parameters_raise_value_error_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda L: L.MbLSLoss(margin=-1), "margin=-1"),
        (lambda L: L.MbLSLoss(margin=float("nan")), "margin=nan"),
        (lambda L: L.MbLSLoss(lam=-0.1), "lam=-0.1"),
        (lambda L: L.MbLSDiceLoss(margin=-2.5), "margin=-2.5"),
        (lambda L: L.FocalLoss(gamma=-1), "gamma=-1"),
        (lambda L: L.LabelSmoothingLoss(alpha=1.0), "alpha=1.0"),
        (lambda L: L.EntropyPenaltyLoss(alpha=1.5), "alpha=1.5"),
        (lambda L: L.SVLSLoss(sigma=0), "sigma=0"),
        (lambda L: L.NACLLoss(kernel_size=4), "kernel_size=4"),
        (lambda L: L.NACLLoss(alpha=-0.2), "alpha=-0.2"),
        (lambda L: L.CELoss(ignore_label=-1), "ignore_label=-1"),
        (lambda L: L.build_loss("mbls", margin=-3.0), "margin=-3.0"),
    ],
)
def test_bad_hyper_parameter_error_names_argument_and_value(make, named):
    import nnunet_mbls.losses as L

    with pytest.raises(ValueError) as info:
        make(L)
    assert named in str(info.value)


#: every numeric hyper-parameter of every loss family: (loss name, argument) -> (an integral valid value, a
#: fractional valid value or None where only integers are valid)
NUMERIC_HYPER_PARAMETERS = {
    ("mbls", "margin"): (2, 2.5),
    ("mbls", "lam"): (1, 0.3),
    ("mbls_dice", "margin"): (2, 2.5),
    ("mbls_dice", "lam"): (1, 0.3),
    ("focal", "gamma"): (2, 1.5),
    ("ls", "alpha"): (0, 0.2),
    ("ecp", "alpha"): (0, 0.2),
    ("svls", "sigma"): (1, 0.7),
    ("nacl", "alpha"): (0, 0.2),
    ("nacl", "kernel_size"): (5, None),
    ("ce", "ignore_label"): (2, None),
}


def _wrong_types(argument, valid):
    """A number written as text, a bool, None (a valid ignore_label) and NaN."""
    values = [str(valid), True, float("nan")]
    return values if argument == "ignore_label" else values + [None]


@pytest.mark.parametrize(
    "name, argument, value",
    [(name, argument, value) for (name, argument), (valid, _) in NUMERIC_HYPER_PARAMETERS.items()
     for value in _wrong_types(argument, valid)],
)
def test_wrong_type_or_nan_hyper_parameter_is_a_value_error_naming_argument_and_value(name, argument, value):
    """Not the TypeError of comparing a str with a number: a trainer's loss_kwargs may hold any of these."""
    with pytest.raises(ValueError) as info:
        build_loss(name, **{argument: value})
    assert argument in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("name, argument", list(NUMERIC_HYPER_PARAMETERS))
def test_numpy_scalar_hyper_parameters_give_the_python_float_loss(name, argument):
    logits, target = make_inputs((4, 5), with_ignore=False, seed=3)
    integral, fractional = NUMERIC_HYPER_PARAMETERS[(name, argument)]
    cases = [(integral, (int, np.int64, np.float64))]
    if fractional is not None:
        cases.append((fractional, (np.float64,)))
    for valid, kinds in cases:
        reference = build_loss(name, **{argument: float(valid)})
        expected = reference(logits, target).item()
        for kind in kinds:
            loss = build_loss(name, **{argument: kind(valid)})
            stored, reference_stored = getattr(loss, argument), getattr(reference, argument)
            assert stored == reference_stored and type(stored) is type(reference_stored), (kind, valid)  # no numpy
            assert loss(logits, target).item() == expected, (kind, valid)
