"""conformal.json: thresholds and intervals against hand computations, coverage against repeated splits."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.conformal import overconfident_case, overconfident_curves
from nnunet_mbls.calibration.conformal.curves import CaseCurves
from nnunet_mbls.calibration.conformal.risk import ConformalError
from nnunet_mbls.calibration.conformal.rules import fit_rules, masks_of, risk_tag, volume_intervals


def _hand_cases() -> list[CaseCurves]:
    """Three cases on a 4-bin grid (worked by hand in the test below)."""
    def case(name, counts, reference):
        return CaseCurves(name, (1,), np.array([counts]), np.array([reference]), 1.0, np.array([np.nan]))
    return [case("a", [5, 1, 1, 2], [0, 1, 1, 2]), case("b", [3, 0, 2, 1], [1, 0, 0, 1]),
            case("c", [4, 0, 0, 1], [0, 0, 0, 0])]


def test_thresholds_equal_the_hand_computation():
    # FNR over thresholds g = 0..4: a [0, 0, .25, .5, 1], b [0, .5, .5, .5, 1]; c has no structure (left out).
    # n = 2, alpha .5: mean <= .25 -> largest g = 1.
    # FDR made non-increasing: a [5/9, 0, 0, 0, 0], b [2/3, 2/3, 2/3, 0, 0], c [1, 1, 1, 1, 0];
    # n = 3: mean <= 1/3 -> smallest g = 3.
    # Volume: masks a [9,4,3,2,0] (V=4), b [6,3,3,1,0] (V=2), c [5,1,1,1,0] (V=0): scores 1, 1, 2;
    # rank ceil(4 * .5) = 2 -> k = 1: grid indices 3 / 1.
    record = fit_rules(_hand_cases(), {1: "lesion"}, ["fnr", "fdr", "volume"], 0.5)
    fit = record["labels"]["lesion"]
    assert fit["fnr"]["grid_index"] == 1 and fit["fnr"]["num_cases"] == 2
    assert fit["fnr"]["threshold"] == pytest.approx(1 / (1 + np.exp(8)))  # logit -16 + 32 * 1/4
    assert fit["fdr"]["grid_index"] == 3 and fit["fdr"]["num_cases"] == 3
    assert fit["volume"]["grid_steps"] == 1
    assert fit["volume"]["low_volume_threshold"] == pytest.approx(1 / (1 + np.exp(-8)))
    assert fit["volume"]["high_volume_threshold"] == pytest.approx(1 / (1 + np.exp(8)))
    assert fit["fnr"]["calibration_risk"] == pytest.approx(0.25)
    # mask volumes at g = 1 relative to the reference: a 4/4, b 3/2
    assert fit["fnr"]["mean_relative_volume"] == pytest.approx((1 + 1.5) / 2)


def test_bad_inputs_name_the_fix():
    cases = _hand_cases()
    with pytest.raises(ConformalError, match="absent from every calibration case.*--labels"):
        fit_rules([cases[2]] * 3, {1: "lesion"}, ["fnr"], 0.5)
    with pytest.raises(ConformalError, match=r"--alpha 0 must lie strictly between 0 and 1"):
        fit_rules(cases, {1: "lesion"}, ["fnr"], 0)
    with pytest.raises(ConformalError, match="at least 9 calibration cases"):
        fit_rules(cases, {1: "lesion"}, ["volume"], 0.1)
    with pytest.raises(ConformalError, match="--risk dice: choose from fnr, fdr, volume"):
        fit_rules(cases, {1: "lesion"}, ["dice"], 0.5)


def test_fdr_and_volume_guarantees_hold_on_repeated_splits():
    curves = overconfident_curves(300, seed=2)
    rng = np.random.default_rng(1)
    alpha, fdr_risks, covered = 0.1, [], []
    for _ in range(100):
        order = rng.permutation(len(curves))
        calibration, test = [curves[i] for i in order[:100]], [curves[i] for i in order[100:]]
        fit = fit_rules(calibration, {1: "disc"}, ["fdr", "volume"], alpha)["labels"]["disc"]
        fdr_risks.append(np.mean([c.false_discovery_rate()[0, fit["fdr"]["grid_index"]] for c in test]))
        lo, hi = fit["volume"]["low_volume_grid_index"], fit["volume"]["high_volume_grid_index"]
        covered.append(np.mean([c.mask_voxels()[0, lo] <= c.reference_voxels()[0] <= c.mask_voxels()[0, hi]
                                for c in test]))
    assert np.mean(fdr_risks) <= alpha + 0.005
    assert 1 - alpha - 0.005 <= np.mean(covered) <= 1 - alpha + 0.05, np.mean(covered)


def test_masks_and_intervals_of_a_new_case_are_the_calibrated_ones():
    curves = overconfident_curves(40, seed=3)
    record = fit_rules(curves, {1: "disc"}, ["fnr", "fdr", "volume"], 0.1)
    probabilities, reference = overconfident_case(np.random.default_rng(9))
    masks = masks_of(record, probabilities)
    fit = record["labels"]["disc"]
    assert set(masks) == {f"{risk_tag('fnr', 0.1)}_disc", "fdr10_disc"}
    assert (masks["fnr10_disc"] == (probabilities[1] >= fit["fnr"]["threshold"])).all()
    assert masks["fnr10_disc"].sum() >= (probabilities.argmax(0) == 1).sum()  # a superset of the argmax here
    intervals = volume_intervals(record, probabilities, 0.5)
    assert 0 < fit["volume"]["high_volume_threshold"] < 0.5 < fit["volume"]["low_volume_threshold"] < 1
    assert intervals["volume_ml_disc_low"] == 0.5 * (probabilities[1] >= fit["volume"]["low_volume_threshold"]).sum()
    assert intervals["volume_ml_disc_high"] == 0.5 * (probabilities[1] >= fit["volume"]["high_volume_threshold"]).sum()
    assert intervals["volume_ml_disc_low"] <= 0.5 * reference.sum() <= intervals["volume_ml_disc_high"]
