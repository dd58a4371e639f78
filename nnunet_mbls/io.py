"""Atomic file writing: write to a temporary file in the target folder, then rename.

A crash, a full disk or a permission error never leaves a truncated file behind and never
touches an existing file until the new content is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` in one rename.

    ``suffix`` is the ending of the temporary file name; writers that pick the format from the
    file name (e.g. ``SimpleITK.WriteImage`` needs ``".nii.gz"``) need the real ending here.

    Raises ``OSError`` naming ``path`` when the folder is not writable or the disk is full;
    the temporary file is removed in every failure case.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    return path


def _write_error(path: Path, e: OSError) -> OSError:
    message = f"could not write {path}: {e.strerror or e}; nothing was changed there"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN allowed, as Python's json writes it)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
