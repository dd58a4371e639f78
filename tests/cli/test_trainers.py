"""nnunet_mbls.cli.trainers: ``nnunet-mbls trainers`` lists every trainer with its hyper-parameters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_trainers_command_lists_every_trainer_with_its_hyper_parameters():
    from nnunet_mbls.trainers import TRAINERS

    out = subprocess.run([str(Path(sys.executable).parent / "nnunet-mbls"), "trainers"], capture_output=True, text=True).stdout
    for cls in TRAINERS:
        line = next(l for l in out.splitlines() if l.split()[0] == cls.__name__)
        for key, value in cls.loss_kwargs.items():
            assert f"{key}={value:g}" in line
    assert re.search(r"^nnUNetTrainerMbLS +MbLSLoss\(margin=10, lam=0.1\)$", out, re.M)
