"""Plot helpers shared by our PNG writers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import matplotlib.style


@contextlib.contextmanager
def default_style() -> Iterator[None]:
    """Matplotlib's default style for the figures made inside the block.

    nnU-Net's logger calls ``seaborn.set(font_scale=2.5)``, which changes the global style of every
    later figure in a training process; our figures opt out of it here.
    """
    with matplotlib.style.context("default"):
        yield
