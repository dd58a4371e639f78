"""--conformal-json applied to one case: masks in the template's geometry, intervals, and the acceptance rule as
the QC flag (fast: generated probabilities, no nnU-Net run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers.conformal import overconfident_case, overconfident_curves
from nnunet_mbls.calibration.conformal.acceptance import AcceptanceFit
from nnunet_mbls.calibration.conformal.risk import ConformalError
from nnunet_mbls.calibration.conformal.rules import fit_rules
from nnunet_mbls.inference.conformal_outputs import ConformalOutputs, pick_flag_rule
from nnunet_mbls.inference.maps import MapWriter
from nnunet_mbls.inference.qc import FlagRule


def _record(tmp_path, threshold):
    fit = AcceptanceFit(threshold, 0.1, 0.1, 40, 30 if threshold else 0, 1 if threshold else 0, 0.01, (0.1, 0.2))
    record = fit_rules(overconfident_curves(40), {1: "disc"}, ["fnr", "volume"], 0.1, fit,
                       {"score": "mean_entropy_fg", "failure_dice": 0.5})
    path = tmp_path / "conformal.json"
    path.write_text(json.dumps(record))
    return path, record


def test_masks_follow_the_template_geometry_and_the_rule_flags(tmp_path):
    path, record = _record(tmp_path, 0.2)
    outputs = ConformalOutputs(path, num_classes=2)
    probabilities, _ = overconfident_case(np.random.default_rng(5))
    template = sitk.GetImageFromArray(np.zeros((1, 32, 32), np.uint8))
    template.SetSpacing((0.7, 0.8, 3.0))
    template.SetOrigin((10.0, -5.0, 2.0))
    template.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    intervals = outputs.write_case(MapWriter(tmp_path / "maps"), "c1", probabilities[:, None], template, (3.0, 0.8, 0.7))
    mask = sitk.ReadImage(str(tmp_path / "maps" / "c1_conformal_fnr10_disc.nii.gz"))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):  # NIfTI stores them in float32
        assert np.allclose(getattr(mask, get)(), getattr(template, get)(), atol=1e-6), get
    expected = probabilities[1] >= record["labels"]["disc"]["fnr"]["threshold"]
    assert (sitk.GetArrayFromImage(mask)[0].astype(bool) == expected).all()
    volume = 3.0 * 0.8 * 0.7 / 1000
    fit = record["labels"]["disc"]["volume"]
    assert intervals["volume_ml_disc_low"] == pytest.approx((probabilities[1] >= fit["low_volume_threshold"]).sum() * volume)
    rule = outputs.flag_rule()
    assert rule == FlagRule("mean_entropy_fg", 0.2, record["acceptance"]["guarantee"])
    assert rule.flags({"mean_entropy_fg": 0.3}) and not rule.flags({"mean_entropy_fg": 0.1})
    assert "with probability >= 0.9" in rule.describe()
    with pytest.raises(ConformalError, match="--flag-score and the acceptance rule of --conformal-json .* pass one"):
        pick_flag_rule(FlagRule("mean_entropy_fg", 0.3), outputs, 1)


def test_no_certified_threshold_flags_every_case_and_bad_files_name_the_fix(tmp_path):
    path, _ = _record(tmp_path, None)
    rule = ConformalOutputs(path, num_classes=2).flag_rule()
    assert rule.flags({"mean_entropy_fg": 0.0}) and "no threshold of mean_entropy_fg is certified" in rule.describe()
    with pytest.raises(ConformalError, match="labels \\['disc'\\] do not exist in this model's 1 classes"):
        ConformalOutputs(path, num_classes=1)
    (tmp_path / "other.json").write_text(json.dumps({"temperature": 1.2}))
    with pytest.raises(ConformalError, match="not a conformal.json .* write it with nnunet-mbls conformal"):
        ConformalOutputs(tmp_path / "other.json", num_classes=2)
    with pytest.raises(ConformalError, match="does not exist; write it with nnunet-mbls conformal"):
        ConformalOutputs(tmp_path / "missing.json", num_classes=2)

