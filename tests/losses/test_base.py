"""Every loss against a naive per-voxel reference written here with explicit loops over voxels."""

from __future__ import annotations

import itertools
import math

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
    svls_kernel,
)

IGNORE = 3  # with C = 3 classes, nnU-Net's ignore label equals the number of classes


# ---------------------------------------------------------------- naive references (numpy, float64, loops)
def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def voxels(shape):
    return itertools.product(*[range(s) for s in shape])


def neighbourhood(idx, shape, radius):
    """All offsets of the (2r+1)^d box around idx: (neighbour index or None if outside, offset)."""
    for off in itertools.product(range(-radius, radius + 1), repeat=len(shape)):
        n = tuple(i + o for i, o in zip(idx, off))
        inside = all(0 <= x < s for x, s in zip(n, shape))
        yield (n if inside else None), off


def naive_loss(name, logits, target, ignore, **hp):
    """Loss of a (B, C, *sp) float64 array and (B, *sp) int array, voxel by voxel."""
    B, C = logits.shape[:2]
    sp = logits.shape[2:]
    total, count = 0.0, 0
    for b in range(B):
        for idx in voxels(sp):
            y = target[(b,) + idx]
            if ignore is not None and y == ignore:
                continue
            l = np.array([logits[(b, k) + idx] for k in range(C)])
            p = softmax(l)
            logp = np.log(p)
            ce = -logp[y]
            if name == "ce":
                v = ce
            elif name == "mbls":
                v = ce + hp["lam"] * sum(max(0.0, l.max() - l[k] - hp["margin"]) for k in range(C)) / C
            elif name == "focal":
                v = -((1 - p[y]) ** hp["gamma"]) * logp[y]
            elif name == "ls":
                v = (1 - hp["alpha"]) * ce + hp["alpha"] * np.mean(-logp)
            elif name == "ecp":
                v = ce - hp["alpha"] * np.mean(-p * logp)
            elif name == "svls":
                # Gaussian weights, centre = sum of neighbours, replicate padding, ignored neighbours dropped
                w = lambda off: 0.0 if not any(off) else math.exp(-sum(o * o for o in off) / (2 * hp["sigma"] ** 2))
                centre = sum(w(off) for off in itertools.product((-1, 0, 1), repeat=len(sp)))
                soft, norm = np.zeros(C), 0.0
                for _, off in neighbourhood(idx, sp, 1):
                    n = tuple(min(max(i + o, 0), s - 1) for i, o, s in zip(idx, off, sp))
                    yn = target[(b,) + n]
                    if ignore is not None and yn == ignore:
                        continue
                    weight = centre if not any(off) else w(off)
                    soft[yn] += weight
                    norm += weight
                v = -(soft / norm * logp).sum()
            elif name == "nacl":
                k = hp["kernel_size"]
                smooth = np.zeros(C)
                for n, _ in neighbourhood(idx, sp, k // 2):
                    if n is None:
                        continue  # zero padding
                    yn = target[(b,) + n]
                    if ignore is not None and yn == ignore:
                        continue
                    smooth[yn] += 1.0 / k ** len(sp)
                v = ce + hp["alpha"] * np.mean(np.abs(smooth - l))
            else:
                raise KeyError(name)
            total += v
            count += 1
    return total / max(count, 1)


DEFAULTS = {
    "ce": {},
    "mbls": {"margin": 1.0, "lam": 0.3},  # small margin so the penalty is active on random logits
    "focal": {"gamma": 3.0},
    "ls": {"alpha": 0.1},
    "ecp": {"alpha": 0.1},
    "svls": {"sigma": 1.0},
    "nacl": {"alpha": 0.1, "kernel_size": 3},
}


def make_inputs(spatial, with_ignore, seed=0, C=3, B=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, C) + spatial, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, C, (B, 1) + spatial, generator=g)
    if with_ignore:
        target[torch.rand(target.shape, generator=g) < 0.3] = IGNORE
    return logits, target


@pytest.mark.parametrize("name", list(DEFAULTS))
@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_ignore", [False, True], ids=["no_ignore", "ignore"])
def test_loss_matches_naive_reference(name, spatial, with_ignore):
    logits, target = make_inputs(spatial, with_ignore)
    ignore = IGNORE if with_ignore else None
    loss = build_loss(name, ignore_label=ignore, **DEFAULTS[name])
    expected = naive_loss(name, logits.numpy(), target[:, 0].numpy(), ignore, **DEFAULTS[name])
    got = loss(logits.float(), target)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the (B, *spatial) target layout gives the same value
    assert loss(logits.float(), target[:, 0]).item() == pytest.approx(got.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_evaluation_gives_the_same_value_and_gradient(name, monkeypatch):
    from nnunet_mbls.losses import fused

    logits, target = make_inputs((5, 6, 7), with_ignore=True, seed=9)
    loss = build_loss(name, ignore_label=IGNORE, **DEFAULTS.get(name, {}))
    results = []
    for chunk in (fused.CHUNK_ELEMENTS, 7):  # one chunk, then many uneven ones (and several slabs)
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
        x = logits.float().requires_grad_()
        value = loss(x, target)
        value.backward()
        results.append((value.detach(), x.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


def test_margin_penalty_gradient_is_exact_and_shares_ties():
    from nnunet_mbls.losses import margin_penalty_map

    x = (torch.randn(2, 4, 3, 5, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: margin_penalty_map(v, 1.0), (x,))
    tied = torch.tensor([[[5.0], [5.0], [-10.0]]], requires_grad=True)  # (B=1, C=3, 1 voxel), two maxima
    margin_penalty_map(tied, 1.0).sum().backward()
    assert tied.grad[0, :, 0].tolist() == [0.5, 0.5, -1.0]  # the penalised class's -1 is shared by the maxima


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


def test_mbls_with_huge_margin_equals_ce():
    logits, target = make_inputs((5, 5, 5), with_ignore=True, seed=4)
    mbls = MbLSLoss(margin=1e6, lam=10.0, ignore_label=IGNORE)(logits.float(), target)
    ce = CELoss(ignore_label=IGNORE)(logits.float(), target)
    torch_ce = torch.nn.functional.cross_entropy(logits.float(), target[:, 0], ignore_index=IGNORE)
    assert mbls.item() == pytest.approx(ce.item(), rel=1e-7)
    assert ce.item() == pytest.approx(torch_ce.item(), rel=1e-6)


def test_mbls_zero_lambda_and_focal_zero_gamma_and_smoothing_zero_alpha_are_ce():
    logits, target = make_inputs((6, 7), with_ignore=False, seed=5)
    ce = CELoss()(logits.float(), target).item()
    for loss in (MbLSLoss(lam=0.0), FocalLoss(gamma=0.0), LabelSmoothingLoss(alpha=0.0), EntropyPenaltyLoss(alpha=0.0)):
        assert loss(logits.float(), target).item() == pytest.approx(ce, rel=1e-6), loss


def test_svls_kernel_equals_the_authors_values():
    k = svls_kernel(1.0, 2)
    assert k[1, 1].item() == pytest.approx(0.5, abs=1e-4)
    for edge in (k[0, 1], k[1, 0], k[1, 2], k[2, 1]):
        assert edge.item() == pytest.approx(0.0778, abs=1e-4)
    for corner in (k[0, 0], k[0, 2], k[2, 0], k[2, 2]):
        assert corner.item() == pytest.approx(0.0472, abs=1e-4)
    k3 = svls_kernel(1.0, 3)
    assert k3.shape == (3, 3, 3) and k3.sum().item() == pytest.approx(1.0) and k3[1, 1, 1].item() == pytest.approx(0.5)


def test_mbls_dice_is_nnunet_dice_ce_plus_the_margin_penalty():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, target = make_inputs((6, 6, 6), with_ignore=True, seed=6)
    reference = DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
        ignore_label=IGNORE, dice_class=MemoryEfficientSoftDiceLoss,
    )(logits.float(), target)
    penalty = naive_loss("mbls", logits.numpy(), target[:, 0].numpy(), IGNORE, margin=2.0, lam=0.5) - naive_loss(
        "ce", logits.numpy(), target[:, 0].numpy(), IGNORE
    )
    got = MbLSDiceLoss(margin=2.0, lam=0.5, ignore_label=IGNORE, batch_dice=True)(logits.float(), target)
    assert penalty > 0.01
    assert got.item() == pytest.approx(reference.item() + penalty, rel=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("with_ignore", [False, True], ids=["no_ignore", "ignore"])
def test_mbls_dice_value_and_gradient_equal_nnunet_dice_ce_plus_penalty_by_autograd(batch_dice, with_ignore):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, target = make_inputs((5, 6, 4), with_ignore, seed=10)
    ignore = IGNORE if with_ignore else None
    x_ref, x = logits.float().requires_grad_(), logits.float().requires_grad_()
    dc_ce = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    gap = (x_ref.max(dim=1, keepdim=True).values - x_ref - 2.0).clamp_min(0).sum(dim=1)  # plain autograd penalty
    keep = torch.ones_like(target[:, 0], dtype=torch.bool) if ignore is None else target[:, 0] != ignore
    reference = dc_ce(x_ref, target) + 0.5 / 3 * gap[keep].mean()
    reference.backward()
    got = MbLSDiceLoss(margin=2.0, lam=0.5, ignore_label=ignore, batch_dice=batch_dice)(x, target)
    got.backward()
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-7)


def test_losses_do_not_mutate_inputs():
    logits, target = make_inputs((5, 5), with_ignore=True, seed=7)
    logits32 = logits.float()
    before = (logits32.clone(), target.clone())
    for name in LOSSES:
        build_loss(name, ignore_label=IGNORE, **DEFAULTS.get(name, {}))(logits32, target)
    assert torch.equal(before[0], logits32) and torch.equal(before[1], target)


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


def test_trainer_names_itself_in_a_loss_kwargs_error():
    """A trainer subclass with a wrong-typed hyper-parameter: the error names the class and its loss_kwargs."""
    from types import SimpleNamespace

    from nnunet_mbls.trainers import nnUNetTrainerMbLS

    class nnUNetTrainerMbLS_text(nnUNetTrainerMbLS):
        loss_kwargs = {"margin": "10", "lam": 0.1}

    trainer = object.__new__(nnUNetTrainerMbLS_text)  # no plans needed to build the loss
    trainer.label_manager = SimpleNamespace(ignore_label=None)
    with pytest.raises(ValueError, match=r"^nnUNetTrainerMbLS_text\.loss_kwargs: margin='10' is invalid.*margin=10\)$"):
        trainer.build_plain_loss()


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


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown"):
        build_loss("dice")
