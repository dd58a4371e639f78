"""The file side of folder evaluation: pairing ``.npz`` files with references, reading and checking them.

Every problem is an :class:`EvaluationError` whose message names the case, the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...geometry import GeometryError, find_plans_file, transpose_forward_of
from ...probabilities import ProbabilityFileError, check_probabilities
from ...probabilities import load_probabilities as _load_probabilities


class EvaluationError(InputError):
    """A case cannot be evaluated; the message names the case and the problem."""


@dataclass
class LabelInfo:
    """Labels of a dataset: class count (softmax channels), foreground labels, ignore label."""

    num_classes: int
    ignore_label: int | None
    names: dict[int, str]

    @classmethod
    def from_dataset_json(cls, dataset_json: dict) -> "LabelInfo":
        """The labels declared in nnU-Net's ``dataset.json``.

        Args:
            dataset_json: the parsed ``dataset.json``; its ``labels`` map name -> integer label, with an
                optional ``ignore`` entry.

        Returns:
            The label info: one class per declared label except ``ignore``.

        Raises:
            EvaluationError: the labels are region-based (not integers): calibration metrics need mutually
                exclusive labels.
        """
        labels = dataset_json["labels"]
        if any(not isinstance(v, int) for v in labels.values()):
            raise EvaluationError(
                "dataset.json declares region-based labels; calibration metrics need mutually exclusive integer labels"
            )
        ignore = labels.get("ignore")
        names = {v: k for k, v in labels.items() if k != "ignore"}
        return cls(num_classes=len(names), ignore_label=ignore, names=names)


def find_dataset_json(pred_folder: Path, ref_folder: Path) -> Path | None:
    """The ``dataset.json`` next to the predictions (nnUNetv2_predict, trainer folders) or the references.

    Args:
        pred_folder: folder of the ``.npz`` files; it, its parent and its grandparent are searched, in that order.
        ref_folder: folder of the reference segmentations; its parent is searched last.

    Returns:
        The first ``dataset.json`` found, or None.
    """
    for candidate in (
        pred_folder / "dataset.json",
        pred_folder.parent / "dataset.json",
        pred_folder.parent.parent / "dataset.json",
        ref_folder.parent / "dataset.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def reader_for(dataset_json: dict, example_file: Path):
    """nnU-Net's image reader for the reference files.

    Args:
        dataset_json: the dataset's ``dataset.json``; its reader override, if any, is honoured.
        example_file: one reference file, whose ending chooses the reader otherwise.

    Returns:
        An instance of the nnU-Net reader/writer class (with ``read_seg``).
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = dict(dataset_json, file_ending=reference_ending(example_file))
    return determine_reader_writer_from_dataset_json(dataset_json, str(example_file), verbose=False)()


def reference_ending(path: Path) -> str:
    """The file ending of an image file, including double endings such as ``.nii.gz``.

    Args:
        path: the image file.

    Returns:
        The known ending it has (``.nii.gz``, ``.nrrd``, ``.mha``, ``.nii``, ``.png``, ``.tif``, ``.tiff``,
        ``.npz``), else its last suffix (empty without one).
    """
    name = path.name
    for ending in (".nii.gz", ".nrrd", ".mha", ".nii", ".png", ".tif", ".tiff", ".npz"):
        if name.endswith(ending):
            return ending
    return path.suffix


def _some(names: list[str], limit: int = 10) -> str:
    """``names`` for a message: the first ``limit`` and how many more."""
    return str(names[:limit])[:-1] + (f", ... ({len(names) - limit} more)]" if len(names) > limit else "]")


def match_cases(ref_folder: Path, pred_folder: Path, chill: bool = False) -> dict[str, tuple[Path, Path]]:
    """Pair every probability file with its reference.

    Args:
        ref_folder: folder of the reference segmentations (``.json``, ``.pkl`` and hidden files are skipped).
        pred_folder: folder of the ``.npz`` probability files.
        chill: as nnU-Net's ``nnUNetv2_evaluate_folder -chill``: references without probabilities are skipped
            instead of being an error, and only the predicted cases are evaluated (e.g. one fold's
            ``validation/`` against all of ``gt_segmentations``).

    Returns:
        case id -> (reference file, ``.npz`` file), in the sorted order of the ``.npz`` files.

    Raises:
        EvaluationError: a folder does not exist; an entry is a broken symbolic link or a folder named like a
            file; there is no ``.npz``; probabilities have no reference (always); references have no
            probabilities (unless ``chill``). The message names the cases only on one side.
    """
    if not pred_folder.is_dir():
        raise EvaluationError(f"prediction folder {pred_folder} does not exist")
    if not ref_folder.is_dir():
        raise EvaluationError(f"reference folder {ref_folder} does not exist")
    preds = {p.name[: -len(".npz")]: p for p in sorted(pred_folder.glob("*.npz"))}
    unreadable = [p for p in preds.values() if not p.is_file()] + [
        r for r in sorted(ref_folder.iterdir()) if r.is_symlink() and not r.exists()]
    if unreadable:
        raise EvaluationError(
            f"{unreadable[0]} is not a readable file: a symbolic link that loops or points nowhere, or a folder "
            f"({len(unreadable)} such entries); remove it or point it at the case's file")
    if not preds:
        raise EvaluationError(
            f"no .npz probability files in {pred_folder}: run nnUNetv2_train ... --npz (or --val --npz) or "
            f"nnUNetv2_predict ... --save_probabilities first"
        )
    refs = {}
    for r in sorted(ref_folder.iterdir()):
        if r.is_file() and not r.name.startswith(".") and not r.name.endswith((".json", ".pkl")):
            refs[r.name[: -len(reference_ending(r))]] = r
    missing = sorted(set(preds) - set(refs))
    if missing:
        raise EvaluationError(
            f"cases {_some(missing)} have probabilities in {pred_folder} but no reference in {ref_folder}"
        )
    unpredicted = sorted(set(refs) - set(preds))
    if unpredicted and not chill:
        raise EvaluationError(
            f"references {_some(unpredicted)} ({len(unpredicted)} of {len(refs)}) have no probabilities (.npz) in "
            f"{pred_folder}: the predictions are incomplete (an interrupted nnUNetv2_predict?) or cover a subset "
            f"(one fold's validation cases); to evaluate only the {len(preds)} predicted cases pass --chill "
            f"(chill=True; as nnUNetv2_evaluate_folder -chill)"
        )
    return {case: (refs[case], preds[case]) for case in preds}


def load_probabilities(case: str, npz_file: Path) -> tuple[np.ndarray, dict]:
    """:func:`nnunet_mbls.probabilities.load_probabilities`, raising :class:`EvaluationError`.

    Args:
        case: the case id, for messages.
        npz_file: the case's ``.npz`` (its ``.pkl`` next to it is read too).

    Returns:
        (C, *spatial) float32 probabilities and the nnU-Net properties (empty dict without a ``.pkl``).

    Raises:
        EvaluationError: the ``.npz`` or ``.pkl`` is unreadable or has no ``probabilities`` array.
    """
    try:
        return _load_probabilities(case, npz_file)
    except ProbabilityFileError as e:
        raise EvaluationError(str(e)) from e


def read_reference(case: str, reader, ref_file: Path) -> tuple[np.ndarray, dict]:
    """The reference segmentation of one case.

    Args:
        case: the case id, for messages.
        reader: nnU-Net's reader (:func:`reader_for`).
        ref_file: the reference file.

    Returns:
        (*spatial) int64 reference labels and the image properties (``spacing``).

    Raises:
        EvaluationError: the reader fails on the file (the reader's error is named in the message).
    """
    try:
        seg, seg_properties = reader.read_seg(str(ref_file))
    except Exception as e:
        raise EvaluationError(f"case {case}: cannot read the reference {ref_file} ({type(e).__name__}: {e})") from e
    return seg[0].astype(np.int64), seg_properties


def check_case(case: str, probs: np.ndarray, ref: np.ndarray, labels: LabelInfo) -> None:
    """Check that one case's probabilities and reference belong together.

    Args:
        case: the case id, for messages.
        probs: (C, *spatial) probabilities.
        ref: (*spatial) reference labels.
        labels: the dataset's labels.

    Raises:
        EvaluationError: ``probs`` are not probabilities of the reference's shape and the dataset's classes
            (:func:`nnunet_mbls.probabilities.check_probabilities`), or the reference holds labels that
            ``dataset.json`` does not declare.
    """
    try:
        check_probabilities(case, probs, labels.num_classes, ref.shape)
    except ProbabilityFileError as e:
        raise EvaluationError(str(e)) from e
    allowed = set(labels.names) | ({labels.ignore_label} if labels.ignore_label is not None else set())
    present = set(np.unique(ref).tolist())
    if not present <= allowed:
        raise EvaluationError(
            f"case {case}: reference contains labels {sorted(present - allowed)} that dataset.json does not declare "
            f"(declared: {sorted(allowed)})"
        )


def resolve_transpose_forward(plans, pred_folder: Path) -> tuple[int, ...] | None:
    """The ``transpose_forward`` that maps nnU-Net's crop box to the reference's axis order.

    Args:
        plans: the model's plans (dict or path of a plans.json), or None to look for the plans.json next to
            the predictions (``pred_folder``, its parent, its grandparent).
        pred_folder: folder of the ``.npz`` files.

    Returns:
        ``transpose_forward`` of the given plans, else of the plans.json found, else None.

    Raises:
        EvaluationError: the plans cannot be read or have no valid ``transpose_forward``.
    """
    if plans is None:
        plans = find_plans_file(pred_folder, pred_folder.parent, pred_folder.parent.parent)
        if plans is None:
            return None
    try:
        return transpose_forward_of(plans)
    except GeometryError as e:
        raise EvaluationError(str(e)) from e
