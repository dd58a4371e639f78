"""The wheel ships the trainer folder, and nnU-Net finds our trainers from a non-editable install."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from helpers.nnunet import REPO


def test_wheel_install_exposes_the_trainer_folder_to_nnunet(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("nnunet_mbls-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnunet_mbls/ext_trainers/nnunet_mbls_trainers.py" in names
    # every module of the source tree is in the wheel (a subpackage missing from pyproject's list once was not)
    modules = {str(p.relative_to(REPO)) for p in (REPO / "nnunet_mbls").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert not any(n.startswith("nnunet_mbls/ext_trainers/__init__") for n in names)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    probe = f"""
import os, nnunet_mbls
from nnunet_mbls.paths import ext_trainer_folder
folder = ext_trainer_folder()
assert str(folder).startswith({str(target)!r}), folder
os.environ["nnUNet_extTrainer"] = str(folder)
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
cls = recursive_find_trainer_class_by_name("nnUNetTrainerMbLS_m5")
import inspect
assert inspect.getfile(cls).startswith({str(target)!r}), inspect.getfile(cls)
assert cls.loss_kwargs == {{"margin": 5.0, "lam": 0.1}}
# the class lives in the installed package, so nnU-Net's spawn pools can pickle it
assert cls.__module__ == "nnunet_mbls.trainers.variants", cls.__module__
print(folder)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(target / "nnunet_mbls" / "ext_trainers")
