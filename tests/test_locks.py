"""nnunet_mbls.locks: the fold lock, and its release when the process holding it is killed."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_fold_lock_is_released_when_its_owner_is_killed(tmp_path):
    from nnunet_mbls.locks import LOCK_NAME, FoldLockTimeout, fold_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from nnunet_mbls.locks import fold_lock\n"
        f"with fold_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FoldLockTimeout, match=f"pid {holder.pid}"):
        with fold_lock(tmp_path, timeout_s=0.5):
            pass
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the stale file is still there ...
    with fold_lock(tmp_path, timeout_s=5):  # ... and does not block
        pass
    assert not (tmp_path / LOCK_NAME).exists()
