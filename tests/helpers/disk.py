"""A full disk: the error a write gets when no space is left."""

from __future__ import annotations

import errno
import os


def enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
