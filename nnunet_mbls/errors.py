"""The errors of nnunet-mbls: every one the command line turns into one line naming the problem and the fix."""

from __future__ import annotations


class NnunetMblsError(Exception):
    """Base class of the errors raised by nnunet-mbls on purpose (bad input, missing prerequisites)."""


class InputError(NnunetMblsError, ValueError):
    """Bad input: the message names the argument or file, the value and the fix."""
