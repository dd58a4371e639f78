"""Where things are: the folder nnUNet_extTrainer must point at, and nnU-Net's path variables."""

from __future__ import annotations

import os
from pathlib import Path

import nnunet_mbls

TRAINERS_MODULE_FILE = "nnunet_mbls_trainers.py"


def ext_trainer_folder() -> Path:
    """The folder holding the one-line re-export of our trainers.

    A wheel install ships it as ``nnunet_mbls/ext_trainers``; a source checkout (editable install)
    has it as the top-level ``trainers/`` folder next to the package.

    Returns:
        The first of the two folders that holds ``nnunet_mbls_trainers.py``.

    Raises:
        FileNotFoundError: neither folder holds it (the message suggests reinstalling).
    """
    package = Path(nnunet_mbls.__file__).resolve().parent
    for candidate in (package / "ext_trainers", package.parent / "trainers"):
        if (candidate / TRAINERS_MODULE_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{TRAINERS_MODULE_FILE} was found neither in {package / 'ext_trainers'} nor in {package.parent / 'trainers'}; "
        f"reinstall nnunet-mbls (pip install nnunet-mbls, or pip install -e . from the repository)"
    )


def env_with_ext_trainers(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` whose nnUNet_extTrainer includes our trainer folder.

    Args:
        env: the environment to copy; None (default) copies ``os.environ``. It is not modified.

    Returns:
        The copy, with :func:`ext_trainer_folder` appended to ``nnUNet_extTrainer`` (``os.pathsep``-separated)
        unless it is already there.

    Raises:
        FileNotFoundError: as :func:`ext_trainer_folder`.
    """
    env = dict(os.environ if env is None else env)
    folder = str(ext_trainer_folder())
    existing = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in existing:
        existing.append(folder)
    env["nnUNet_extTrainer"] = os.pathsep.join(existing)
    return env
