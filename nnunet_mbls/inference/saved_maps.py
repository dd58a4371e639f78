"""``nnunet-mbls maps``: probability/uncertainty maps and QC from a ``nnUNetv2_predict --save_probabilities`` folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..calibration.files import temperature_from_options
from ..io import refuse_outputs_over_inputs, staged_output
from .maps import MapWriter, check_map_request, write_case_maps
from .predict import PredictionInputError
from .conformal_outputs import ConformalOutputs, pick_flag_rule
from .qc import DEFAULT_BOUNDARY_WIDTH, FlagRule, case_scores, write_qc_table
from .region_maps import (binary_entropy_sum, calibrated, check_region_probabilities, check_region_request,
                          region_channel_names, region_scores, region_temperatures)
from .uncertainty import entropy


def maps_from_probabilities(input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                            temperature: float | None = None, calibration_json: str | os.PathLike | None = None,
                            maps: Sequence[str] = ("probabilities",), maps_dtype: str = "float32",
                            flag_rule: FlagRule | None = None, boundary_width: int = DEFAULT_BOUNDARY_WIDTH,
                            conformal_json: str | os.PathLike | None = None) -> Path:
    """``nnunet-mbls maps``: maps and QC from a ``nnUNetv2_predict --save_probabilities`` folder.

    Each ``<case>.npz`` (probabilities on the image grid) needs its ``<case>.pkl`` (spacing) and the
    segmentation ``<case><ending>`` nnU-Net wrote beside it (the geometry template). With a temperature, the
    probabilities become normalize(p ** (1/T)) first (argmax, hence the segmentation, is unchanged). The
    output is staged: a bad case (or a kill) leaves ``output_folder`` as it was.

    Args:
        input_folder: ``-i``, a ``nnUNetv2_predict --save_probabilities`` output (with its ``dataset.json``;
            its ``plans.json`` is read when present).
        output_folder: ``-o``: ``maps/``, ``qc.csv`` and ``qc.json``.
        temperature: ``-t``, T > 0; pass at most one of ``temperature`` and ``calibration_json``.
        calibration_json: a ``calibration.json`` whose ``temperature`` is used.
        maps: map kinds to write (default ``("probabilities",)``); ``mutual_information`` needs the folds'
            predictions and is refused when the first case is written.
        maps_dtype: ``"float32"`` (default) or ``"uint8"``.
        flag_rule: the QC flag rule; None (default) uses the one-fold default; ``mean_fold_dice`` is refused.
        boundary_width: half-width in voxels of the boundary band of ``mean_entropy_boundary`` (default 2).
        conformal_json: a ``conformal.json`` (``nnunet-mbls conformal``): its masks, volume intervals and
            acceptance rule are applied (:mod:`~nnunet_mbls.inference.conformal_outputs`).

    Returns:
        The path of ``qc.csv``.

    Raises:
        PredictionInputError: a missing input folder, ``dataset.json``, ``.npz`` files, ``.pkl`` or
            segmentation; a ``mean_fold_dice`` flag rule.
        InputError: both ``temperature`` and ``calibration_json``, a bad T or calibration file, an unreadable ``dataset.json``/``plans.json``, or a probability
            file that cannot be used.
        ValueError: outputs over the inputs, an unknown map kind or dtype, maps for a reorienting reader, or
            ``mutual_information`` among ``maps``.
    """
    import SimpleITK as sitk

    from ..calibration.temperature import apply_temperature
    from ..io import read_json_file
    from ..probabilities import check_probabilities, load_probabilities

    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if not input_folder.is_dir():
        raise PredictionInputError(f"-i {input_folder} is not a folder; pass a nnUNetv2_predict --save_probabilities output")
    refuse_outputs_over_inputs({"-o": output_folder}, {"--calibration-json": calibration_json or [],
                                                       "--conformal-json": conformal_json or []}, {"-i": input_folder})
    dataset_json_file = input_folder / "dataset.json"
    if not dataset_json_file.is_file():
        raise PredictionInputError(f"{dataset_json_file} is missing; nnUNetv2_predict writes it into its output folder")
    dataset_json = read_json_file(dataset_json_file, "-i's dataset.json")
    regions = region_channel_names(dataset_json)
    if regions is None:
        temperature = temperature_from_options(temperature, calibration_json)
    else:
        temperatures = region_temperatures(temperature, calibration_json, regions)
        temperature = None if temperatures is None else temperatures.tolist()
        check_region_request(maps)
        if conformal_json is not None:
            raise PredictionInputError("--conformal-json is for softmax models; this dataset is region-based")
    plans_file = input_folder / "plans.json"
    reader = read_json_file(plans_file, "-i's plans.json").get("image_reader_writer") if plans_file.is_file() else None
    check_map_request(maps, maps_dtype, reader)
    ending = dataset_json["file_ending"]
    npz_files = sorted(input_folder.glob("*.npz"))
    if not npz_files:
        raise PredictionInputError(f"no .npz files in {input_folder}; predict with nnUNetv2_predict ... --save_probabilities")
    for npz in npz_files:
        for needed in (npz.with_suffix(".pkl"), input_folder / f"{npz.stem}{ending}"):
            if not needed.is_file():
                raise PredictionInputError(f"{needed} is missing: maps need the .pkl and the segmentation that "
                                           f"nnUNetv2_predict writes next to each .npz")
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "ignore"}
    foreground = {int(v): k for k, v in labels.items() if int(v) != 0} if regions is None else {}
    conformal = ConformalOutputs(conformal_json, len(labels)) if conformal_json is not None else None
    rule = pick_flag_rule(flag_rule, conformal, 1)
    if rule.score == "mean_fold_dice":
        raise PredictionInputError("--flag-score mean_fold_dice needs the folds' predictions: use nnunet-mbls predict")
    rows = {}
    # staged: a bad case (or a kill) leaves the output folder as it was; the rerun after the repair succeeds
    with staged_output(output_folder) as staging:
        writer = MapWriter(staging / "maps", maps_dtype)
        for npz in tqdm(npz_files, desc="maps", unit="case"):
            case = npz.stem
            probabilities, properties = load_probabilities(case, npz)
            template = sitk.ReadImage(str(input_folder / f"{case}{ending}"))
            size = tuple(reversed(template.GetSize()))
            grid = (1,) * (probabilities.ndim - 1 - len(size)) + size  # 2-D images: nnU-Net's (1, y, x)
            if regions is not None:
                check_region_probabilities(case, probabilities, len(regions), grid, f"its segmentation {case}{ending}")
                probabilities = calibrated(probabilities, temperatures)
                h = binary_entropy_sum(probabilities)
                write_case_maps(writer, case, probabilities, template, maps, dict(enumerate(regions)), h)
                segmentation = sitk.GetArrayFromImage(template).reshape(grid)
                rows[case] = region_scores(segmentation, probabilities, h, properties["spacing"], regions, boundary_width)
                continue
            check_probabilities(case, probabilities, len(labels), grid, f"its segmentation {case}{ending}")
            if temperature is not None:
                probabilities = apply_temperature(probabilities, temperature)
            segmentation = probabilities.argmax(0)
            h = entropy(probabilities)
            write_case_maps(writer, case, probabilities, template, maps, foreground, h)
            rows[case] = case_scores(segmentation, probabilities, properties["spacing"], foreground, boundary_width,
                                     entropy_map=h)
            if conformal is not None:
                rows[case].update(conformal.write_case(writer, case, probabilities, template, properties["spacing"]))
        settings = {"command": "maps", "input": str(input_folder), "temperature": temperature,
                    "regions": regions, "maps": list(maps),
                    "maps_dtype": maps_dtype, "boundary_width": boundary_width,
                    **(conformal.settings() if conformal is not None else {})}
        write_qc_table(rows, rule, staging, settings)
    return output_folder / "qc.csv"
