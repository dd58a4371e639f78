"""One writer per fold folder: a lock file that holds its owner's pid, released by the kernel when the owner dies.

Everything that writes into a trained fold (the calibration step, ``nnunet-mbls calibrate``, vector scaling,
an ensemble's shared temperature) runs inside :func:`fold_lock`, so two runs on one fold never interleave
their files (``calibration.json`` recording one temperature while the checkpoint holds another).

The lock is ``fcntl.flock`` on ``<fold>/.nnunet_mbls.lock``: a lock whose owner was killed is released by
the kernel, so a stale lock file never blocks (the pid written into it is only for the message). The file
is removed on release, and a waiter re-checks after locking that the file it holds is still the one at the
path (the usual unlink race). Within one process the lock is re-entrant.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from .errors import NnunetMblsError

LOCK_NAME = ".nnunet_mbls.lock"
#: seconds between "waiting for" messages while another process holds the lock
REPORT_EVERY_S = 60.0
_held: dict[Path, int] = {}  # lock path -> nesting depth in this process


class FoldLockTimeout(NnunetMblsError, RuntimeError):
    """Another process held the fold's lock for longer than the caller was willing to wait."""


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def fold_lock(folder: str | os.PathLike, timeout_s: float | None = None, what: str = "nnunet-mbls") -> Iterator[None]:
    """Hold ``folder``'s lock inside the block; wait while another process holds it.

    Args:
        folder: the fold folder; when it does not exist the block runs unlocked (nothing is there to protect).
        timeout_s: give up after this many seconds of waiting (None: wait as long as it takes).
        what: who locks, for the other process's message.

    Yields:
        None, while the lock is held (re-entrant within this process).

    Raises:
        FoldLockTimeout: naming the folder, the owner and the lock file after ``timeout_s``.
    """
    folder = Path(folder)
    path = (folder / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    if not folder.is_dir():  # nothing to protect yet (and a lock must not create an untrained fold's folder)
        yield
        return
    fd = _acquire(path, timeout_s, what)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        try:
            os.remove(path)
        except OSError:
            pass
        os.close(fd)  # closing releases the flock


def _acquire(path: Path, timeout_s: float | None, what: str) -> int:
    start, last_report = time.monotonic(), None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            now = time.monotonic()
            if timeout_s is not None and now - start >= timeout_s:
                raise FoldLockTimeout(
                    f"{path.parent} is in use by {_owner(path)} (lock file {path}); wait until it finishes. The lock "
                    f"is released when its owner exits, so a killed run never leaves it behind") from None
            if last_report is None or now - last_report >= REPORT_EVERY_S:
                print(f"nnunet-mbls: waiting for {_owner(path)} to finish writing into {path.parent}", file=sys.stderr)
                last_report = now
            time.sleep(0.2)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous owner removed the file after we opened it
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename} ({what})\n".encode())
        return fd


@contextmanager
def fold_locks(folders: list[Path]):
    """:func:`fold_lock` on every folder, taken in sorted order (no deadlock between two runs).

    Args:
        folders: fold folders; duplicates (after resolving) are locked once. Each lock waits without a
            timeout and names ``nnunet-mbls calibrate`` as its owner.

    Yields:
        None, inside all the locks.
    """
    with ExitStack() as stack:
        for folder in sorted({Path(f).resolve() for f in folders}):
            stack.enter_context(fold_lock(folder, what="nnunet-mbls calibrate"))
        yield
