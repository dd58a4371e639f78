"""What ``--conformal-json`` adds to ``predict`` and ``maps``: per case and label the conformal masks as NIfTI
(``maps/<case>_conformal_<risk><100α>_<label>.nii.gz``, uint8 0/1 in the input geometry), the volume interval
(``volume_ml_<label>_low`` / ``_high`` in ``qc.csv``) and, when the record holds one, the acceptance rule as the
QC flag rule, its guarantee stated in ``qc.json``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..calibration.conformal.risk import ConformalError
from ..calibration.conformal.rules import check_record, masks_of, volume_intervals
from ..io import read_json_file
from .maps import MapWriter, label_file_name
from .qc import FlagRule, default_flag_rule, voxel_volume_ml


class ConformalOutputs:
    """A ``conformal.json`` applied to the cases of one ``predict``/``maps`` run."""

    def __init__(self, path: str | os.PathLike, num_classes: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConformalError(f"--conformal-json {self.path} does not exist; write it with nnunet-mbls conformal")
        self.record = read_json_file(self.path, "--conformal-json")
        check_record(self.record, num_classes, f"--conformal-json {self.path}")

    def flag_rule(self) -> FlagRule | None:
        """The acceptance rule as a :class:`FlagRule` (flag = not accepted), or None when the record has none."""
        rule = self.record.get("acceptance")
        if rule is None:
            return None
        return FlagRule(rule["score"], rule["threshold"], rule["guarantee"])

    def write_case(self, writer: MapWriter, case: str, probabilities: np.ndarray, template,
                   spacing) -> dict[str, float]:
        """Write the case's masks; return its volume intervals (ml) for the QC table."""
        for key, mask in masks_of(self.record, probabilities).items():
            tag, name = key.split("_", 1)
            writer.write_mask(case, f"conformal_{tag}_{label_file_name(name)}", mask, template)
        return volume_intervals(self.record, probabilities, voxel_volume_ml(spacing))

    def settings(self) -> dict:
        """What ``qc.json`` records about the rules applied."""
        return {"conformal_json": str(self.path.resolve()), "conformal_alpha": self.record["alpha"],
                "conformal_assumption": self.record["assumption"], "conformal_source": self.record.get("source", {})}


def pick_flag_rule(flag_rule: FlagRule | None, conformal: ConformalOutputs | None, num_folds: int) -> FlagRule:
    """``--flag-score``'s rule, else the acceptance rule of ``--conformal-json``, else the default; both is an error."""
    accepting = conformal.flag_rule() if conformal is not None else None
    if flag_rule is not None and accepting is not None:
        raise ConformalError(f"--flag-score and the acceptance rule of --conformal-json {conformal.path} both define "
                             f"the QC flag; pass one of them")
    return flag_rule or accepting or default_flag_rule(num_folds)
