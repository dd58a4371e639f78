"""Temperature scaling of saved nnU-Net probability files (ensembles, heads that cannot be folded)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import InputError
from ..io import atomic_write, read_json_file, refuse_outputs_over_inputs, staged_output
from ..probabilities import check_probabilities, load_probabilities
from .temperature import apply_temperature


def check_temperature_value(value: object, source: str) -> float:
    """Validate a temperature given by the user or read from a file.

    Args:
        value: the temperature (an int or float; bool is refused).
        source: the argument or file it came from, for the message (e.g. ``"-t"``).

    Returns:
        ``value`` as a float T > 0.

    Raises:
        InputError: naming ``source`` unless ``value`` is a finite number > 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{source}: temperature {value!r} is invalid; T must be a finite number > 0 (e.g. 1.5)")
    return float(value)


def read_calibration_temperature(calibration_json: str | os.PathLike, key: str = "temperature",
                                 fallback: str | None = None, argument: str = "--calibration-json") -> float:
    """The temperature ``key`` (else ``fallback`` where ``key`` is absent or null) of a ``calibration.json``
    written by ``nnunet-mbls calibrate`` or our trainers.

    Args:
        calibration_json: the file to read.
        key: the entry holding T (default ``"temperature"``).
        fallback: the entry to read instead where ``key`` is absent or null; None (default) for none.
        argument: the argument or description of the file, for messages (default ``"--calibration-json"``).

    Returns:
        T as a float > 0.

    Raises:
        InputError: naming ``argument`` and the file when it is missing, not JSON, not an object, or lacks a valid T.
    """
    record = read_json_file(calibration_json, argument)
    if isinstance(record, dict) and record.get(key) is None and fallback is not None:
        key = fallback
    if not isinstance(record, dict) or key not in record:
        raise InputError(f"{argument} {calibration_json} holds no '{key}'; pass the calibration.json that "
                         f"nnunet-mbls calibrate (or our trainers) wrote into the fold folder")
    return check_temperature_value(record[key], f"{argument} {calibration_json}")


def apply_temperature_to_folder(
    input_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    temperature: float | None = None,
    calibration_json: str | os.PathLike | None = None,
) -> list[Path]:
    """Write normalize(p ** (1/T)) of every ``.npz`` in ``input_folder`` to ``output_folder``.

    The ``.pkl`` properties are copied along, so nnU-Net's ensembling and our evaluation read the
    output like the input. T comes from ``temperature`` or from a ``calibration.json``. Every file is
    checked (:func:`~nnunet_mbls.probabilities.check_probabilities`) and the output is staged: on bad
    input nothing is written, so the same command succeeds once the input is repaired.

    Args:
        input_folder: folder of nnU-Net ``.npz`` (+ ``.pkl``) probability files.
        output_folder: where the scaled files go; must not be (or lie in) ``input_folder``, and must not hold
            files of the same names (nothing is overwritten).
        temperature: T > 0; pass exactly one of ``temperature`` and ``calibration_json``.
        calibration_json: a ``calibration.json`` whose ``temperature`` is used.

    Returns:
        The written ``.npz`` paths, in ``output_folder``, in sorted order.

    Raises:
        InputError: not exactly one of ``temperature`` and ``calibration_json``, bad T, an input folder that is
            not a folder or holds no ``.npz``, existing files in the output folder, or a probability file that
            cannot be used (naming the case and the file), or an output folder inside (or equal to) the input
            folder or equal to ``calibration_json`` (:func:`~nnunet_mbls.io.refuse_outputs_over_inputs`).
    """
    src, dst = Path(input_folder), Path(output_folder)
    if (temperature is None) == (calibration_json is None):
        raise InputError("pass exactly one of temperature=T (-t) or calibration_json=PATH (--calibration-json)")
    temperature = (read_calibration_temperature(calibration_json) if calibration_json is not None
                   else check_temperature_value(temperature, "-t"))
    if not src.is_dir():
        raise InputError(f"-i {src} is not a folder; pass a folder of nnU-Net .npz (+ .pkl) files")
    refuse_outputs_over_inputs({"-o": dst}, {"--calibration-json": calibration_json or []}, {"-i": src})
    files = sorted(src.glob("*.npz"))
    if not files:
        raise InputError(f"no .npz files in -i {src}; predict with nnUNetv2_predict ... --save_probabilities")
    clashes = [f.name for f in files if (dst / f.name).exists() or (dst / f.with_suffix(".pkl").name).exists()]
    if clashes:
        raise InputError(f"-o {dst} already holds {clashes[:3]}{'...' if len(clashes) > 3 else ''}; choose an empty "
                         f"folder (nothing is overwritten)")
    written = []
    with staged_output(dst) as staging:
        for npz in tqdm(files, desc=f"applying T={temperature:.4g}"):
            case = npz.name[: -len(".npz")]
            probabilities, _ = load_probabilities(case, npz)
            check_probabilities(case, probabilities)
            with np.load(npz) as data:  # the other arrays nnU-Net may have stored, unchanged
                arrays = {key: data[key] for key in data.files if key != "probabilities"}
            arrays["probabilities"] = apply_temperature(probabilities, temperature)

            def write(tmp: str) -> None:
                """Save ``arrays`` to ``tmp`` as a compressed ``.npz``."""
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)

            atomic_write(staging / npz.name, write)
            written.append(dst / npz.name)
            pkl = npz.with_suffix(".pkl")
            if pkl.is_file():
                atomic_write(staging / pkl.name, lambda tmp: shutil.copyfile(pkl, tmp))
    return written


def temperature_from_options(temperature: float | None, calibration_json: str | os.PathLike | None) -> float | None:
    """The temperature of ``-t T`` or ``--calibration-json F`` (at most one of them), checked; None without either.

    Raises:
        InputError: both are given, or the value or file is bad (see :func:`check_temperature_value`,
            :func:`read_calibration_temperature`).
    """
    if temperature is not None and calibration_json is not None:
        raise InputError("pass either -t T or --calibration-json F, not both")
    if calibration_json is not None:
        return read_calibration_temperature(calibration_json)
    return None if temperature is None else check_temperature_value(temperature, "-t")

