"""nnunet_mbls.cli.env: ``nnunet-mbls env`` prints an export line a shell can compose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_env_command_prints_a_composable_export_line():
    out = subprocess.run([str(Path(sys.executable).parent / "nnunet-mbls"), "env"], capture_output=True, text=True).stdout
    shell = subprocess.run(["bash", "-c", f'export nnUNet_extTrainer=/other; {out.strip()}; echo "$nnUNet_extTrainer"'],
                           capture_output=True, text=True).stdout.strip()
    folder, other = shell.split(":")
    assert other == "/other"
    assert (Path(folder) / "nnunet_mbls_trainers.py").read_text().startswith("from nnunet_mbls.trainers import *")
