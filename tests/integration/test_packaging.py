"""The wheel ships the trainer folder, and nnU-Net finds our trainers from a non-editable install."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_exposes_the_trainer_folder_to_nnunet(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("nnunet_mbls-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnunet_mbls/ext_trainers/nnunet_mbls_trainers.py" in names
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


def test_env_command_prints_a_composable_export_line():
    out = subprocess.run([str(Path(sys.executable).parent / "nnunet-mbls"), "env"], capture_output=True, text=True).stdout
    shell = subprocess.run(["bash", "-c", f'export nnUNet_extTrainer=/other; {out.strip()}; echo "$nnUNet_extTrainer"'],
                           capture_output=True, text=True).stdout.strip()
    folder, other = shell.split(":")
    assert other == "/other"
    assert (Path(folder) / "nnunet_mbls_trainers.py").read_text().startswith("from nnunet_mbls.trainers import *")


def test_trainers_command_lists_every_trainer_with_its_hyper_parameters():
    from nnunet_mbls.trainers import TRAINERS

    out = subprocess.run([str(Path(sys.executable).parent / "nnunet-mbls"), "trainers"], capture_output=True, text=True).stdout
    for cls in TRAINERS:
        line = next(l for l in out.splitlines() if l.split()[0] == cls.__name__)
        for key, value in cls.loss_kwargs.items():
            assert f"{key}={value:g}" in line
    assert re.search(r"^nnUNetTrainerMbLS +MbLSLoss\(margin=10, lam=0.1\)$", out, re.M)


def test_trainer_catalog_agrees_with_the_trainer_classes_and_the_loss_registry():
    """``nnunet-mbls trainers`` prints the catalog; the classes read their loss from it: same names, order, values."""
    from nnunet_mbls.losses import LOSSES
    from nnunet_mbls.trainers import TRAINERS, __all__ as exported
    from nnunet_mbls.trainers.catalog import CATALOG, LOSS_CLASS_NAMES

    assert [spec.name for spec in CATALOG] == [cls.__name__ for cls in TRAINERS]
    for spec, cls in zip(CATALOG, TRAINERS):
        assert (cls.loss_name, cls.loss_kwargs) == (spec.loss_name, spec.loss_kwargs), cls.__name__
        assert LOSSES[cls.loss_name].__name__ == spec.loss_class_name, cls.__name__
        assert cls.loss_kwargs is not spec.loss_kwargs  # a class cannot change the catalog
    assert LOSS_CLASS_NAMES == {name: loss.__name__ for name, loss in LOSSES.items()}
    assert set(exported) == {cls.__name__ for cls in TRAINERS} | {"nnUNetTrainerCalibrated", "TRAINERS"}


@pytest.mark.parametrize("command", [["--help"], ["env"], ["trainers"], ["evaluate", "--help"], ["calibrate", "--help"]])
def test_light_commands_import_neither_torch_nor_nnunet_nor_monai(command):
    """The start-up of these commands stays light (timings: benchmarks/bench_startup.py)."""
    script = Path(sys.executable).parent / "nnunet-mbls"  # the installed console script, as users run it
    run = subprocess.run([sys.executable, "-X", "importtime", str(script), *command], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "nnunet_mbls.cli" in imported, run.stderr[-2000:]  # the importtime lines are there
    assert not imported & {"torch", "nnunetv2", "monai", "numpy"}, sorted(imported & {"torch", "nnunetv2", "monai", "numpy"})
