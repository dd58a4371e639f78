"""nnunet_mbls.cli: the light commands of the console script start without importing torch, nnU-Net, MONAI or numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("command", [["--help"], ["env"], ["trainers"], ["evaluate", "--help"], ["calibrate", "--help"]])
def test_light_commands_import_neither_torch_nor_nnunet_nor_monai(command):
    """The start-up of these commands stays light (timings: benchmarks/bench_startup.py)."""
    script = Path(sys.executable).parent / "nnunet-mbls"  # the installed console script, as users run it
    run = subprocess.run([sys.executable, "-X", "importtime", str(script), *command], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "nnunet_mbls.cli" in imported, run.stderr[-2000:]  # the importtime lines are there
    assert not imported & {"torch", "nnunetv2", "monai", "numpy"}, sorted(imported & {"torch", "nnunetv2", "monai", "numpy"})
