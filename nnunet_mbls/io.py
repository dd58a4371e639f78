"""Writing files so that nothing is lost: atomic writes, staged outputs, and outputs kept apart from inputs.

- :func:`atomic_write`: a file is written under a hidden partial folder beside its destination, then moved
  onto it in one rename. A crash, a kill, a full disk or a permission error never leaves a truncated file
  under the final name, and the temporary name matches no glob of ours or nnU-Net's (``*.nii.gz``,
  ``*.npz``, ``*.pth``): it is a *folder* named ``.nnunet_mbls-partial.<pid>.<host>.<random>``, and nnU-Net
  lists files only. Leftovers of a killed process are removed the next time anything is written into that
  folder (:func:`remove_stale_partials`).
- :func:`staged_output`: every file of a command is written into one partial folder and moved into place
  only when the command succeeds, so a command that stops on bad input leaves its output as it was.
- :func:`refuse_outputs_over_inputs`: no output path may be an input file or lie inside an input folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .errors import InputError

PARTIAL_PREFIX = ".nnunet_mbls-partial."
_PARTIAL = re.compile(r"^\.nnunet_mbls-partial\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})\.[0-9a-f]+$")
#: temporary files of nnunet-mbls 0.2 (``mkstemp(prefix=".<name>.", suffix=...)``), removed like partial folders
_LEGACY_TEMP = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}(?P<suffix>\.tmp|\.nii\.gz|\.nrrd|\.mha|\.png|\.npz)$")
#: a partial folder of another machine (a shared file system) is removed only when it is this old
FOREIGN_PARTIAL_AGE_S = 24 * 3600
_cleaned: set[Path] = set()


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the partial folders (and 0.2-style temporary files) that a killed process left in ``folder``.

    A partial folder is stale when its process no longer runs on this machine, or, when it was made on
    another machine, after :data:`FOREIGN_PARTIAL_AGE_S`. Errors are skipped silently: an unreadable
    ``folder`` or entry is left as it is.

    Args:
        folder: the folder to clean (not recursive).

    Returns:
        The removed paths ([] when ``folder`` cannot be listed).
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match:
            foreign = match["host"] != host
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            stale = age > FOREIGN_PARTIAL_AGE_S if foreign else not _pid_alive(int(match["pid"]))
            if stale:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
            continue
        legacy = _LEGACY_TEMP.match(entry.name)
        if legacy and entry.is_file(follow_symlinks=False) and (
                legacy["suffix"] == ".tmp" or legacy["final"].endswith(legacy["suffix"])):
            try:
                os.remove(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _clean_once(folder: Path) -> None:
    key = folder.resolve()
    if key not in _cleaned:
        remove_stale_partials(folder)
        _cleaned.add(key)


def _partial_folder(parent: Path) -> Path:
    """A new, empty, hidden partial folder in ``parent`` (created with ``parent`` if needed)."""
    parent.mkdir(parents=True, exist_ok=True)
    _clean_once(parent)
    path = parent / f"{PARTIAL_PREFIX}{os.getpid()}.{_host_tag()}.{secrets.token_hex(6)}"
    path.mkdir()
    return path


@contextmanager
def partial_folder(parent: str | os.PathLike) -> Iterator[Path]:
    """A hidden working folder in ``parent``, removed at the end of the block (after a kill: by the next write).

    Args:
        parent: the folder to create it in (created with its parents if needed; stale partial folders in it
            are removed first, once per process).

    Yields:
        The new, empty partial folder.
    """
    path = _partial_folder(Path(parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` in one rename.

    ``tmp_path`` has the same file name as ``path`` (writers that pick the format from the ending, such as
    ``SimpleITK.WriteImage`` or ``nibabel.save``, work unchanged) inside a hidden partial folder beside it.

    Args:
        path: the destination file; its folder is created if needed.
        write: a callable that writes the whole file to the path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: naming ``path`` when the folder is not writable or the disk is full; the partial folder is
            removed in every failure case and ``path`` is untouched.
    """
    path = Path(path)
    try:
        partial = _partial_folder(path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    tmp = partial / path.name
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def _write_error(path: Path, e: OSError) -> OSError:
    message = f"could not write {path}: {e.strerror or e}; nothing was changed there"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`), flushed and fsynced before the rename.

    Args:
        path: the destination file.
        text: the whole content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: as :func:`atomic_write`.
    """

    def write(tmp: str) -> None:
        """Write, flush and fsync ``text`` to ``tmp``."""
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN allowed, as Python's json writes it), atomically.

    Args:
        path: the destination file.
        obj: a JSON-serialisable object; keys keep their order.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: as :func:`atomic_write`.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_output(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden staging folder whose files replace those of ``folder`` only when the block succeeds.

    Files written under the staging folder (subfolders included) are moved to the same relative paths in
    ``folder`` at the end of the block, each in one rename; on an exception the staging folder is removed and
    ``folder`` is as it was (removed again, with the parents the block created, if it did not exist). After a kill, the staging folder is a
    hidden partial folder, removed by the next write into ``folder``.

    Args:
        folder: the output folder (created with its parents if needed; those it created are removed again if
            they end up empty).

    Yields:
        The staging folder, inside ``folder``.
    """
    folder = Path(folder)
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # innermost first
    staging = _partial_folder(folder)
    try:
        yield staging
        for root, _, files in os.walk(staging):
            target = folder / Path(root).relative_to(staging)
            target.mkdir(parents=True, exist_ok=True)
            _clean_once(target)
            for name in files:
                os.replace(Path(root) / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for made in created:  # folders this block created and left empty go again
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB blocks.

    Args:
        path: the file.

    Returns:
        The hex digest (64 characters).
    """
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: str | os.PathLike, argument: str) -> Any:
    """The JSON content of ``path``.

    Args:
        path: the file to read.
        argument: the command-line argument (or description) the file came from, for messages.

    Returns:
        The parsed JSON value (any type).

    Raises:
        InputError: naming ``argument`` and the file when it is missing, unreadable, not UTF-8 or not JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{argument} {path} does not exist; pass an existing file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{argument} {path} cannot be read as JSON ({e}); the file is truncated or not JSON: "
                         f"pass the file nnU-Net or nnunet-mbls wrote") from e


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_outputs_over_inputs(
    outputs: Mapping[str, str | os.PathLike],
    input_files: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike]] = {},
    input_folders: Mapping[str, str | os.PathLike] = {},
    replaceable: Iterable[str] = (),
) -> None:
    """InputError (a ValueError) unless every output path stays clear of every input.

    Args:
        outputs: argument name (e.g. ``"-o"``) -> a file or folder the command writes.
        input_files: argument name -> a file (or files) the command reads.
        input_folders: argument name -> a folder the command reads.
        replaceable: file names of this command's own earlier outputs that may be replaced inside an input
            folder (e.g. ``calibration_metrics_fg.json``, written into the prediction folder by default).

    Raises:
        InputError: an output is an input file (symbolic links resolved), an input folder, or lies inside an
            input folder (except a file with a ``replaceable`` name).
    """
    replaceable = set(replaceable)
    files = []
    for name, value in input_files.items():
        for f in [value] if isinstance(value, (str, os.PathLike)) else value:
            files.append((name, Path(f)))
    for out_name, out in outputs.items():
        out = Path(out)
        resolved = out.resolve()
        for name, f in files:
            if resolved == f.resolve():
                raise InputError(f"{out_name} {out} is the input {f} ({name}); it would be overwritten: write the "
                                 f"output somewhere else")
        for name, folder in input_folders.items():
            folder = Path(folder)
            if _inside(resolved, folder.resolve()) and not (out.name in replaceable and resolved != folder.resolve()):
                raise InputError(f"{out_name} {out} lies in the input folder {name} {folder}; inputs there could be "
                                 f"overwritten: write the output outside the input folders")
