"""nnunet_mbls.io: atomic writes keep the old file or write the new one whole, on a full disk, a denied rename or
a killed writer, and the next write cleans up what a killed one left."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from helpers.disk import enospc


def test_atomic_write_disk_full_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    from nnunet_mbls.io import atomic_write, atomic_write_json

    target = tmp_path / "calibration.json"
    atomic_write_json(target, {"temperature": 1.5})
    old = target.read_bytes()

    def half_then_full(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"temperature": 2.')  # a truncated JSON reaches the disk ...
            f.flush()
        enospc()  # ... then the disk is full

    with pytest.raises(OSError) as info:
        atomic_write(target, half_then_full)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "nothing was changed" in str(info.value)
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]


def test_atomic_write_permission_denied_and_unserialisable_json_change_nothing(tmp_path, monkeypatch):
    from nnunet_mbls import io

    target = tmp_path / "evaluation.json"
    io.atomic_write_json(target, {"a": 1})
    old = target.read_bytes()

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    with monkeypatch.context() as m:  # as root chmod does not deny: the rename is refused instead
        m.setattr(io.os, "replace", denied)
        with pytest.raises(PermissionError, match="could not write .*evaluation.json"):
            io.atomic_write_json(target, {"a": 2})
    with monkeypatch.context() as m:  # no space even for the temporary file
        m.setattr(io, "_partial_folder", enospc)
        with pytest.raises(OSError, match="could not write .*evaluation.json.*nothing was changed"):
            io.atomic_write_json(target, {"a": 3})
    with pytest.raises(TypeError):
        io.atomic_write_json(target, {"a": object()})
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]


def test_a_killed_atomic_write_leaves_no_file_a_glob_matches_and_the_next_write_cleans_it(tmp_path):
    script = (
        "import sys, time\nfrom nnunet_mbls.io import atomic_write\n"
        "def write(tmp):\n    open(tmp, 'wb').write(b'half'); print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(tmp_path / 'c067.nii.gz')!r}, write)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    (tmp_path / ".checkpoint_final_calibrated.pth.k2j4h6g8.tmp").write_bytes(b"")  # a 0.2 leftover
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 2 and not list(tmp_path.glob("*.nii.gz")) and not list(tmp_path.glob("*.pth"))
    from nnunet_mbls.io import atomic_write_text

    subprocess.run([sys.executable, "-c", f"from nnunet_mbls.io import atomic_write_text; "
                                          f"atomic_write_text({str(tmp_path / 'x.txt')!r}, 'ok')"], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    atomic_write_text(tmp_path / "y.txt", "ok")  # a live process's partial folder is never taken for stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt", "y.txt"]
