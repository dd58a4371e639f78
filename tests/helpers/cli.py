"""The console script, in this process or in a subprocess, and the one error line of a failing command.

The tests of issue 17 (nothing lost, nothing inconsistent) feed a command the input of the report and assert one
error line naming the file and the fix, the inputs byte-identical, and the output as it was before the command
started; the concurrency and SIGKILL tests run the real console script in subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess

from helpers.nnunet import BIN


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script: in a subprocess with ``env`` (nnU-Net reads its folders at import), else in this process."""
    if env is not None:
        return subprocess.run([str(BIN / "nnunet-mbls"), *args], capture_output=True, text=True,
                              env=dict(os.environ, **env))
    from nnunet_mbls.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"nnunet-mbls {command}: error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]
