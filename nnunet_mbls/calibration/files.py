"""Temperature scaling of saved nnU-Net probability files (ensembles, heads that cannot be folded)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import atomic_write
from .temperature import apply_temperature


def apply_temperature_to_folder(
    input_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    temperature: float | None = None,
    calibration_json: str | os.PathLike | None = None,
) -> list[Path]:
    """Write normalize(p ** (1/T)) of every ``.npz`` in ``input_folder`` to ``output_folder``.

    The ``.pkl`` properties are copied along, so nnU-Net's ensembling and our evaluation read the
    output like the input. T comes from ``temperature`` or from a ``calibration.json``.
    Refuses to write into the input folder or over existing files.
    """
    src, dst = Path(input_folder), Path(output_folder)
    if (temperature is None) == (calibration_json is None):
        raise ValueError("pass exactly one of temperature=T or calibration_json=PATH")
    if calibration_json is not None:
        temperature = float(json.loads(Path(calibration_json).read_text())["temperature"])
    files = sorted(src.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {src}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"output folder {dst} is the input folder; choose another folder (nothing is overwritten)")
    clashes = [f.name for f in files if (dst / f.name).exists()]
    if clashes:
        raise FileExistsError(f"{dst} already holds {clashes[:3]}{'...' if len(clashes) > 3 else ''}; choose an empty folder")
    written = []
    for npz in tqdm(files, desc=f"applying T={temperature:.4g}"):
        with np.load(npz) as data:
            arrays = dict(data)
        arrays["probabilities"] = apply_temperature(arrays["probabilities"].astype(np.float32), temperature)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        written.append(atomic_write(dst / npz.name, write))
        pkl = npz.with_suffix(".pkl")
        if pkl.is_file():
            atomic_write(dst / pkl.name, lambda tmp: shutil.copyfile(pkl, tmp))
    return written
