"""``nnunet-mbls predict`` and ``nnunet-mbls maps``: segmentations, probability/uncertainty maps and QC.

``predict`` runs nnU-Net's ``nnUNetPredictor`` (its preprocessing, sliding window with mirroring TTA, and
its export function) and adds only the loop over folds, which keeps running sums per fold for mutual
information and fold agreement. The ensemble logits are summed and divided exactly as nnU-Net does
(same dtype, same order), so ``OUT/<case><ending>`` equals ``nnUNetv2_predict``'s segmentation.

``maps`` computes the same maps and QC from an existing ``nnUNetv2_predict --save_probabilities`` folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..calibration.files import read_calibration_temperature
from ..errors import InputError
from ..io import atomic_write, atomic_write_json, refuse_outputs_over_inputs
from ..layout import CALIBRATED_CHECKPOINT, CHECKPOINT_FINAL, FoldFolder
from .conformal_outputs import ConformalOutputs, pick_flag_rule
from .maps import MapWriter, check_map_request, write_case_maps
from .qc import DEFAULT_BOUNDARY_WIDTH, FlagRule, case_scores, write_qc_table
from .uncertainty import FoldStatistics, entropy



class PredictionInputError(InputError):
    """Bad input of predict/maps; the message names the argument, the value and the fix."""


@dataclass
class FoldModels:
    """Which checkpoint each fold uses and the temperature still to apply to its logits (1.0: none)."""

    folder: Path
    folds: list[str]
    checkpoint: str
    temperatures: list[float] = field(default_factory=list)
    calibration: str = "none"


def resolve_folds(model_folder: Path, folds: Sequence[str | int], checkpoint: str | None, calibrated: bool,
                  dataset: str, configuration: str, trainer: str, plans: str) -> FoldModels:
    """Check that every fold exists with the checkpoint asked for; with ``calibrated`` pick its calibration.

    Where ``checkpoint_final.pth`` or ``-chk`` is used, also checks that every fold's file loads as an nnU-Net
    checkpoint; calibrated checkpoints are checked with ``calibration_problem`` instead.

    Args:
        model_folder: the trainer folder ``<trainer>__<plans>__<configuration>``.
        folds: the folds to predict with (``0``, ``"all"`` ...).
        checkpoint: ``-chk``, the checkpoint file name; None for ``checkpoint_final.pth``.
        calibrated: every fold's ``checkpoint_final_calibrated.pth`` (the temperature folded into the head);
            where a fold lacks it but has ``calibration.json``, every fold uses ``checkpoint_final.pth`` and its
            logits are divided by the fold's temperature instead (same probabilities up to nnU-Net's fp16
            accumulation).
        dataset, configuration, trainer, plans: the model, for the commands in messages.

    Returns:
        :class:`FoldModels`: the folder, the folds, the checkpoint name, the temperature per fold (1.0: none)
        and how the calibration is applied.

    Raises:
        PredictionInputError: ``-chk`` other than the final checkpoints together with ``calibrated``; a fold
            without the checkpoint; a checkpoint that does not load; with ``calibrated``, an unusable
            calibration or a fold without calibration.
        InputError: with ``calibrated`` and the temperature fallback, a ``calibration.json`` that cannot be
            read or holds no valid temperature.
    """
    folds = [str(f) for f in folds]
    if calibrated and checkpoint not in (None, CHECKPOINT_FINAL, CALIBRATED_CHECKPOINT):
        raise PredictionInputError(f"-chk {checkpoint} and --calibrated both choose the checkpoint; pass only one")
    name = checkpoint or CHECKPOINT_FINAL
    fold_folders = {fold: FoldFolder.in_trainer_folder(model_folder, fold) for fold in folds}
    for fold, folder in fold_folders.items():
        needed = [CALIBRATED_CHECKPOINT, CHECKPOINT_FINAL] if calibrated else [name]
        if not any((folder.path / n).is_file() for n in needed):
            raise PredictionInputError(
                f"fold {fold}: {folder.path / needed[-1]} does not exist; train it (nnUNetv2_train {dataset} "
                f"{configuration} {fold} -tr {trainer} -p {plans}), drop it from -f, or pass an existing -chk")
    if not calibrated:
        check_checkpoints_load(model_folder, folds, name, "restore or retrain it, or pass another -chk")
        return FoldModels(model_folder, folds, name, [1.0] * len(folds))
    named = {fold: calibrated_checkpoint_named(folder) for fold, folder in fold_folders.items()}
    if all((folder.path / named[fold]).is_file() for fold, folder in fold_folders.items()):
        from ..calibration.folds import calibration_problem

        if len(set(named.values())) > 1:
            raise PredictionInputError(
                f"the folds' calibrations are folded into different checkpoints ({named}: some were validated with "
                f"nnUNetv2_train --val_best); calibrate them alike, e.g. {fold_folders[folds[0]].calibrate_command(' '.join(folds))}")
        for fold, folder in fold_folders.items():
            problem = calibration_problem(folder.path)
            if problem is not None:
                raise PredictionInputError(f"fold {fold}: the calibration is not usable ({problem}); redo it with "
                                           f"{folder.calibrate_command()}, or predict without --calibrated")
        return FoldModels(model_folder, folds, named[folds[0]], [1.0] * len(folds), "calibrated checkpoints")
    temperatures = []
    for fold, folder in fold_folders.items():
        calibration = folder.calibration_record
        if not calibration.is_file() or not folder.checkpoint_final.is_file():
            raise PredictionInputError(
                f"fold {fold} has no calibration ({calibration.name} / {CALIBRATED_CHECKPOINT} missing): run "
                f"{folder.calibrate_command()} first, or predict without --calibrated")
        if named[fold] != CALIBRATED_CHECKPOINT:
            raise PredictionInputError(
                f"fold {fold}'s temperature was fitted on {named[fold].replace('_calibrated', '')}'s outputs (nnUNetv2_train "
                f"--val_best) and {named[fold]} is missing; rerun {folder.train_command('--val --val_best')}, or "
                f"{folder.calibrate_command()} to calibrate {CHECKPOINT_FINAL}")
        # the T its calibrated checkpoint would hold (an ensemble T, or its own)
        temperatures.append(read_calibration_temperature(calibration, "checkpoint_temperature", "temperature",
                                                         f"fold {fold}'s calibration record"))
    check_checkpoints_load(model_folder, folds, CHECKPOINT_FINAL, "restore or retrain it")
    return FoldModels(model_folder, folds, CHECKPOINT_FINAL, temperatures, "temperatures of calibration.json")


def calibrated_checkpoint_named(folder: FoldFolder) -> str:
    """The calibrated checkpoint a fold's ``calibration.json`` names (``checkpoint_best_calibrated.pth`` after
    ``nnUNetv2_train --val_best``), else ``checkpoint_final_calibrated.pth``."""
    try:
        named = json.loads(folder.calibration_record.read_text()).get("calibrated_checkpoint")
    except (OSError, ValueError, AttributeError):
        named = None
    return named if isinstance(named, str) and named else CALIBRATED_CHECKPOINT


def check_checkpoints_load(model_folder: Path, folds: Sequence[str], name: str, fix: str) -> None:
    """Check that every fold's checkpoint ``name`` loads as an nnU-Net checkpoint.

    Args:
        model_folder: the trainer folder.
        folds: the folds.
        name: the checkpoint file name in each fold folder.
        fix: what to tell the user to do, appended to the message.

    Raises:
        PredictionInputError: naming the file when it cannot be loaded or holds no ``network_weights`` dict.
    """
    for fold in folds:
        path = FoldFolder.in_trainer_folder(model_folder, fold).path / name
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
                raise ValueError("no 'network_weights' state dict")
        except Exception as e:  # truncated, not a torch file, not nnU-Net's: all mean the file cannot serve
            raise PredictionInputError(f"fold {fold}: {path} cannot be loaded as an nnU-Net checkpoint "
                                       f"({type(e).__name__}: {e}); {fix}") from e


def check_input_channels(list_of_lists: list[list[str]], dataset_json: dict, input_folder: Path) -> None:
    """Check that every case has exactly one image file per channel of the model.

    Args:
        list_of_lists: per case, its image files (nnU-Net's input lists).
        dataset_json: the model's dataset.json (``channel_names`` or ``modality``, ``file_ending``).
        input_folder: ``-i``, for the message.

    Raises:
        PredictionInputError: naming the case, its files and the expected ones.
    """
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    ending = dataset_json["file_ending"]
    for files in list_of_lists:
        case = os.path.basename(files[0])[: -len(ending) - 5]
        expected = [f"{case}_{int(k):04d}{ending}" for k in channels]
        if sorted(os.path.basename(f) for f in files) != sorted(expected):
            raise PredictionInputError(
                f"-i {input_folder}: case {case} has {len(files)} channel file(s) "
                f"({', '.join(os.path.basename(f) for f in files)}) but the model expects {len(channels)} "
                f"({', '.join(f'_{int(k):04d} {v}' for k, v in channels.items())}); pass exactly {', '.join(expected)}")


def check_folders(input_folder: Path, output_folder: Path, model_files: Sequence[Path] = (),
                  previous_stage: Path | None = None) -> None:
    """Check that ``input_folder`` exists and the outputs stay clear of it, of ``model_files`` and of
    ``previous_stage``.

    Args:
        input_folder: ``-i``.
        output_folder: ``-o``; with its ``dataset.json`` and ``plans.json``, which predict writes.
        model_files: the model's files that are read (e.g. its dataset.json and plans.json).
        previous_stage: ``-prev_stage_predictions``, whose segmentations a cascade stage reads.

    Raises:
        PredictionInputError: ``input_folder`` is not a folder, or an output is an input file or lies in
            ``input_folder``.
    """
    if not input_folder.is_dir():
        raise PredictionInputError(f"-i {input_folder} is not a folder; pass the folder of input images")
    try:
        refuse_outputs_over_inputs({"-o": output_folder, "-o (dataset.json)": output_folder / "dataset.json",
                                    "-o (plans.json)": output_folder / "plans.json"},
                                   {"the model": list(model_files)},
                                   {"-i": input_folder, **({"-prev_stage_predictions": previous_stage} if previous_stage else {})})
    except ValueError as e:
        raise PredictionInputError(str(e)) from e


def _fold_loop_logits(predictor, data: torch.Tensor, temperatures: Sequence[float], stats: FoldStatistics) -> torch.Tensor:
    """nnU-Net's ``predict_logits_from_preprocessed_data`` with each fold's logits also given to ``stats``.

    Same arithmetic as nnU-Net: the first fold's tensor accumulates the others in place, then is divided by
    the number of folds, so the result is bit-identical to ``nnUNetv2_predict``'s logits.
    """
    from torch._dynamo import OptimizedModule

    from nnunetv2.configuration import default_num_processes

    n_threads = torch.get_num_threads()
    torch.set_num_threads(default_num_processes if default_num_processes < n_threads else n_threads)
    prediction = None
    for params, temperature in zip(predictor.list_of_parameters, temperatures):
        network = predictor.network._orig_mod if isinstance(predictor.network, OptimizedModule) else predictor.network
        network.load_state_dict(params)
        logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
        if temperature != 1.0:
            logits /= temperature
        stats.add(logits)
        if prediction is None:
            prediction = logits
        else:
            prediction += logits
    if len(predictor.list_of_parameters) > 1:
        prediction /= len(predictor.list_of_parameters)
    torch.set_num_threads(n_threads)
    return prediction


def _preprocessed_cases(predictor, list_of_lists, output_truncated, num_processes: int,
                        previous_stage: list[str] | None = None) -> Iterator[dict]:
    """nnU-Net's preprocessing: its background iterator, or its sequential ``run_case`` with ``-npp 0`` (for a
    cascade stage with the previous stage's segmentation one-hot encoded behind the image channels, as nnU-Net's
    iterator does)."""
    if num_processes > 0:
        for item in predictor._internal_get_data_iterator_from_lists_of_filenames(
                list_of_lists, previous_stage, output_truncated, num_processes):
            data = item["data"]
            if isinstance(data, str):  # nnU-Net hands large arrays over as temporary .npy files
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            yield {"data": data, "data_properties": item["data_properties"], "ofile": item["ofile"]}
        return
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    for i, (files, ofile) in enumerate(zip(list_of_lists, output_truncated)):
        seg_file = previous_stage[i] if previous_stage is not None else None
        data, seg, properties = preprocessor.run_case(files, seg_file, predictor.plans_manager,
                                                      predictor.configuration_manager, predictor.dataset_json)
        if seg_file is not None:
            data = np.vstack((data, convert_labelmap_to_one_hot(seg[0], predictor.label_manager.foreground_labels,
                                                                 data.dtype)))
        yield {"data": torch.from_numpy(data), "data_properties": properties, "ofile": ofile}


def predict(input_folder: str | os.PathLike, output_folder: str | os.PathLike, dataset: str | int,
            configuration: str, folds: Sequence[str | int], trainer: str, plans: str = "nnUNetPlans",
            checkpoint: str | None = None, calibrated: bool = False, maps: Sequence[str] = (),
            maps_dtype: str = "float32", device: str = "cuda", step_size: float = 0.5, disable_tta: bool = False,
            num_processes_preprocessing: int = 3, flag_rule: FlagRule | None = None,
            boundary_width: int = DEFAULT_BOUNDARY_WIDTH, conformal_json: str | os.PathLike | None = None,
            prev_stage_predictions: str | os.PathLike | None = None) -> Path:
    """``nnunet-mbls predict``: segmentations, maps and QC of a folder of images. See the module docstring and
    the README.

    Args:
        input_folder: ``-i``, images named as nnU-Net expects (``<case>_0000<ending>``, one file per channel).
        output_folder: ``-o``: ``<case><ending>`` segmentations, ``maps/``, ``qc.csv``, ``qc.json``, and the
            model's ``dataset.json`` and ``plans.json`` (as ``nnUNetv2_predict`` writes them).
        dataset: dataset id or name.
        configuration: a single-stage configuration (``2d``, ``3d_fullres``, ``3d_lowres``).
        folds: the folds to ensemble (``0``, ``"all"`` ...).
        trainer: the trainer class name.
        plans: the plans identifier (default ``nnUNetPlans``).
        checkpoint: ``-chk``, a checkpoint file name; None for ``checkpoint_final.pth``.
        calibrated: predict with each fold's calibration (see :func:`resolve_folds`).
        maps: map kinds to write (default none; see :data:`~nnunet_mbls.inference.MAP_KINDS`).
        maps_dtype: ``"float32"`` (default) or ``"uint8"``.
        device: the torch device (default ``"cuda"``); on the CPU torch uses every core, as nnUNetv2_predict does.
        step_size: sliding-window step as a fraction of the patch size (default 0.5).
        disable_tta: switch off mirroring test-time augmentation (default False).
        num_processes_preprocessing: nnU-Net's background preprocessing workers (default 3); 0 preprocesses
            sequentially in this process.
        flag_rule: the QC flag rule; None (default) uses :func:`~nnunet_mbls.inference.qc.default_flag_rule`.
        boundary_width: half-width in voxels of the boundary band of ``mean_entropy_boundary`` (default 2).
        conformal_json: a ``conformal.json`` (``nnunet-mbls conformal``) whose masks, volume intervals and
            acceptance rule are applied (:mod:`~nnunet_mbls.inference.conformal_outputs`).
        prev_stage_predictions: for a cascade stage (``3d_cascade_fullres``), the folder of the previous stage's
            segmentations (``<case><ending>``), as ``nnUNetv2_predict -prev_stage_predictions``.

    Returns:
        The path of ``qc.csv``.

    Raises:
        PredictionInputError: a missing input folder or trained model, outputs over inputs, missing or
            unloadable checkpoints or calibrations, ``mean_fold_dice`` with one fold, a cascade stage without
            ``prev_stage_predictions`` (or them without a cascade stage, or a case without its segmentation there),
            no input images, or a case with the wrong channel files.
        InputError: with ``calibrated``, a ``calibration.json`` that cannot be read (see :func:`resolve_folds`).
        ValueError: an unknown map kind or dtype, or maps for a reorienting reader/writer.
    """
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    import SimpleITK as sitk

    from ..geometry import network_to_original

    input_folder, output_folder = Path(input_folder), Path(output_folder)
    dataset_name = maybe_convert_to_dataset_name(str(dataset) if str(dataset).startswith("Dataset") else int(dataset))
    model_folder = Path(get_output_folder(dataset_name, trainer, plans, configuration))
    check_folders(input_folder, output_folder, [model_folder / "dataset.json", model_folder / "plans.json",
                                                *([Path(conformal_json)] if conformal_json is not None else [])],
                  Path(prev_stage_predictions) if prev_stage_predictions is not None else None)
    if not model_folder.is_dir():
        raise PredictionInputError(f"no trained model in {model_folder}; check -d/-c/-tr/-p or train first")
    models = resolve_folds(model_folder, folds, checkpoint, calibrated, dataset_name, configuration, trainer, plans)
    plans_json = json.loads((model_folder / "plans.json").read_text())
    check_map_request(maps, maps_dtype, plans_json.get("image_reader_writer"))
    num_classes = len([k for k in json.loads((model_folder / "dataset.json").read_text())["labels"] if k != "ignore"])
    conformal = ConformalOutputs(conformal_json, num_classes) if conformal_json is not None else None
    rule = pick_flag_rule(flag_rule, conformal, len(models.folds))
    if rule.score == "mean_fold_dice" and len(models.folds) < 2:
        raise PredictionInputError("--flag-score mean_fold_dice needs at least 2 folds (-f 0 1 ...); choose an entropy score")

    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_predict does on the CPU
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                perform_everything_on_device=True, device=torch_device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in models.folds],
                                                   checkpoint_name=models.checkpoint)
    nnunet_command = (f"nnUNetv2_predict -i {input_folder} -o {output_folder} -d {dataset} -c {configuration} -f "
                      f"{' '.join(models.folds)} -tr {trainer} -p {plans} -chk {models.checkpoint} --save_probabilities")
    previous = predictor.configuration_manager.previous_stage_name
    if previous is not None and prev_stage_predictions is None:
        raise PredictionInputError(
            f"{configuration} is a cascade stage: pass -prev_stage_predictions FOLDER with the {previous} segmentations "
            f"of the same images (e.g. nnunet-mbls predict -c {previous} ..., as nnUNetv2_predict takes them)")
    if previous is None and prev_stage_predictions is not None:
        raise PredictionInputError(f"-prev_stage_predictions is for cascade stages; {configuration} has no previous stage")
    if predictor.label_manager.has_regions:
        raise PredictionInputError(
            f"{dataset_name} is region-based (one sigmoid per region); the maps and QC of nnunet-mbls predict are for "
            f"softmax models. Predict the (calibrated) region probabilities with nnU-Net: {nnunet_command}")
    list_of_lists, output_truncated, previous_stage = predictor._manage_input_and_output_lists(
        str(input_folder), str(output_folder), None if prev_stage_predictions is None else str(prev_stage_predictions),
        True, 0, 1, False)
    if not list_of_lists:
        raise PredictionInputError(f"no input images ending in _0000{predictor.dataset_json['file_ending']} in {input_folder}")
    check_input_channels(list_of_lists, predictor.dataset_json, input_folder)
    if prev_stage_predictions is not None:
        missing = [f for f in previous_stage if not os.path.isfile(f)]
        if missing:
            raise PredictionInputError(f"-prev_stage_predictions {prev_stage_predictions} lacks {len(missing)} case(s) "
                                       f"({missing[0]} ...): predict them with the {previous} stage first")
    else:
        previous_stage = None
    for name, content in (("dataset.json", predictor.dataset_json), ("plans.json", predictor.plans_manager.plans)):
        atomic_write_json(output_folder / name, content)  # as nnUNetv2_predict: evaluate/maps find them here

    label_manager = predictor.label_manager
    foreground = {int(v): k for k, v in predictor.dataset_json["labels"].items() if k != "ignore" and int(v) != 0}
    writer = MapWriter(output_folder / "maps", maps_dtype)
    ending = predictor.dataset_json["file_ending"]
    rows = {}
    cases = _preprocessed_cases(predictor, list_of_lists, output_truncated, num_processes_preprocessing, previous_stage)
    for item in tqdm(cases, total=len(list_of_lists), desc=f"predict ({len(models.folds)} fold(s))", unit="case"):
        case = os.path.basename(item["ofile"])
        properties = item["data_properties"]
        stats = FoldStatistics(keep_probabilities="mutual_information" in maps, keep_segmentations=len(models.folds) >= 2)
        with torch.inference_mode():  # nnU-Net's sliding window returns inference tensors
            logits = _fold_loop_logits(predictor, item["data"], models.temperatures, stats)
            mi = stats.mutual_information().numpy()[None] if "mutual_information" in maps else None
        segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.numpy(), predictor.plans_manager, predictor.configuration_manager, label_manager, properties,
            return_probabilities=True)
        seg_file = output_folder / f"{case}{ending}"
        rw = predictor.plans_manager.image_reader_writer_class()
        atomic_write(seg_file, lambda tmp: rw.write_seg(segmentation, tmp, properties))
        h = entropy(probabilities)
        if mi is not None:
            mi = network_to_original(mi, properties, predictor.plans_manager, predictor.configuration_manager)[0]
        template = sitk.ReadImage(str(seg_file)) if maps or conformal is not None else None
        if maps:
            write_case_maps(writer, case, probabilities, template, maps, foreground, h, mi)
        fold_dice = stats.fold_dice(sorted(foreground)) if len(models.folds) >= 2 else None
        rows[case] = case_scores(segmentation, probabilities, properties["spacing"], foreground, boundary_width,
                                 fold_dice, h)
        if conformal is not None:
            rows[case].update(conformal.write_case(writer, case, probabilities, template, properties["spacing"]))
    settings = {"command": "predict", "model": str(model_folder), "folds": models.folds, "checkpoint": models.checkpoint,
                "calibration": models.calibration, "temperatures_applied_to_logits": models.temperatures,
                "tta": not disable_tta, "step_size": step_size, "maps": list(maps), "maps_dtype": maps_dtype,
                "boundary_width": boundary_width, "prev_stage_predictions": str(prev_stage_predictions or "") or None,
                **(conformal.settings() if conformal is not None else {})}
    return write_qc_table(rows, rule, output_folder, settings)


def __getattr__(name: str):  # maps_from_probabilities moved to saved_maps.py; still importable from here
    if name == "maps_from_probabilities":
        from .saved_maps import maps_from_probabilities

        return maps_from_probabilities
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
