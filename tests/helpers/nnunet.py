"""nnU-Net folders in a temporary directory and a runner for real nnU-Net / nnunet-mbls commands on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: the short test trainers, found by nnU-Net by folder path (nnUNet_extTrainer)
TEST_TRAINERS = Path(__file__).resolve().parents[1] / "ext_trainers"
BIN = Path(sys.executable).parent


class NnUNet:
    """nnU-Net folders under one root and a runner for nnU-Net / nnunet-mbls commands on the CPU."""

    def __init__(self, root: Path):
        from nnunet_mbls.paths import ext_trainer_folder

        self.root = root
        self.raw, self.preprocessed, self.results = (root / n for n in ("raw", "preprocessed", "results"))
        for p in (self.raw, self.preprocessed, self.results):
            p.mkdir(parents=True, exist_ok=True)
        self.env = dict(
            os.environ,
            nnUNet_raw=str(self.raw),
            nnUNet_preprocessed=str(self.preprocessed),
            nnUNet_results=str(self.results),
            nnUNet_extTrainer=os.pathsep.join([str(ext_trainer_folder()), str(TEST_TRAINERS)]),
            nnUNet_compile="f",
            nnUNet_def_n_proc="1",
            OMP_NUM_THREADS="2",
            PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),  # emitted jobs call nnU-Net by name
        )

    def run(self, *args: str, training: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(self.env, nnUNet_n_proc_DA="0") if training else self.env
        cmd = [str(BIN / args[0]), *args[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        return proc

    def plan(self, dataset_id: int, configuration: str) -> None:
        self.run("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1",
                 "-npfp", "1", "--verify_dataset_integrity")

    def train(self, dataset_id: int, configuration: str, trainer: str, fold: str = "0", *extra: str, check=True):
        return self.run("nnUNetv2_train", str(dataset_id), configuration, fold, "-tr", trainer, "-device", "cpu",
                        *extra, training=True, check=check)

    def train_watching(self, dataset_id: int, configuration: str, trainer: str, fold: str, watch: Path,
                       suffixes=(".npz", ".pkl")) -> tuple[subprocess.CompletedProcess, set, int]:
        """:meth:`train` while polling the folder ``watch`` every 20 ms: (the finished process, every file name with
        one of ``suffixes`` seen there during the run, the number of polls that found the folder)."""
        import time

        cmd = [str(BIN / "nnUNetv2_train"), str(dataset_id), configuration, fold, "-tr", trainer, "-device", "cpu"]
        proc = subprocess.Popen(cmd, env=dict(self.env, nnUNet_n_proc_DA="0"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen, polls = set(), 0
        while proc.poll() is None:
            if watch.is_dir():
                seen |= {p.name for p in watch.iterdir() if p.suffix in suffixes}
                polls += 1
            time.sleep(0.02)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-6000:]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), seen, polls

    def predict_probabilities(self, dataset_id: int, dataset: str, case: str, configuration: str, trainer: str,
                              checkpoints: tuple[str, ...], work: Path, plans: str = "nnUNetPlans") -> dict:
        """``nnUNetv2_predict --save_probabilities`` of one training case with each checkpoint:
        {checkpoint: probabilities (C, *spatial) as nnU-Net exported them}. The case's image is linked into
        ``work/in``."""
        import numpy as np

        inputs = work / "in"
        inputs.mkdir(exist_ok=True)
        image = self.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz"
        (inputs / image.name).symlink_to(image)
        out = {}
        for checkpoint in checkpoints:
            self.run("nnUNetv2_predict", "-i", str(inputs), "-o", str(work / checkpoint), "-d", str(dataset_id), "-c",
                     configuration, "-f", "0", "-tr", trainer, "-p", plans, "-chk", checkpoint, "--save_probabilities",
                     "-device", "cpu", "-npp", "0", "-nps", "0")
            out[checkpoint] = np.load(work / checkpoint / f"{case}.npz")["probabilities"]
        return out

    def fold_folder(self, dataset_folder: str, trainer: str, configuration: str, fold: int = 0) -> Path:
        return self.results / dataset_folder / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"

    def apply_env(self, monkeypatch) -> None:
        """Make this process see the same nnU-Net folders (for in-process calls)."""
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
                    "nnUNet_def_n_proc"):
            monkeypatch.setenv(key, self.env[key])
        monkeypatch.setenv("nnUNet_n_proc_DA", "0")
