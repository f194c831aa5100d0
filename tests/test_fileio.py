"""runtime/fileio.py: every file pockc writes is replaced atomically -- a reader (or the next run)
sees the old file or the new one, never a truncated or half-written one."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from pockc.runtime import fileio
from pockc.runtime.fileio import TMP_SUFFIX, atomic_write, remove_stale_temps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _temps(d):
    return [n for n in os.listdir(d) if n.endswith(TMP_SUFFIX)]


def test_writes_str_and_bytes_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "a.json"
    assert atomic_write(p, '{"x": 1}\n') == str(p)
    assert json.loads(p.read_text()) == {"x": 1}
    atomic_write(str(p), b"\x00\x01binary")
    assert p.read_bytes() == b"\x00\x01binary"
    atomic_write(p, "é" * 100_000)                 # str is UTF-8
    assert p.read_text(encoding="utf-8") == "é" * 100_000
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
    with pytest.raises(TypeError):
        atomic_write(p, {"not": "data"})
    assert p.read_text(encoding="utf-8") == "é" * 100_000


def test_permissions_like_a_plain_open_and_symlinks_followed(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o644       # 0o666 less the umask
        os.chmod(tmp_path / "new", 0o600)
        atomic_write(tmp_path / "new", "y")
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o600       # an existing file keeps its mode
    finally:
        os.umask(old)
    (tmp_path / "target").write_text("old")
    os.symlink(tmp_path / "target", tmp_path / "link")
    atomic_write(tmp_path / "link", "new")
    assert os.path.islink(tmp_path / "link") and (tmp_path / "target").read_text() == "new"
    os.mkdir(tmp_path / "d")
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "d", "x")
    assert _temps(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "scores.json"
    p.write_text("old contents")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(p, "new contents " * 1000)
    monkeypatch.undo()
    assert p.read_text() == "old contents" and _temps(tmp_path) == []


KILLED_WRITER = r"""
import os, sys, time
from pockc.runtime import fileio
real_fsync = os.fsync
def slow_fsync(fd):                     # the data is in the temporary file, not yet renamed over
    print("writing", flush=True)
    time.sleep(60)
    real_fsync(fd)
fileio.os.fsync = slow_fsync
fileio.atomic_write(sys.argv[1], "NEW " * 250_000)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_file_intact(tmp_path):
    p = tmp_path / "scores-abc.json"
    p.write_text('{"previous": true}\n')
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(p)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert json.loads(p.read_text()) == {"previous": True}        # not truncated, not half-written
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".scores-abc.json.")   # the killed writer's temporary file
    assert remove_stale_temps(tmp_path) == [str(tmp_path / left[0])]    # its process is gone: removed
    assert sorted(os.listdir(tmp_path)) == ["scores-abc.json"]


def test_remove_stale_temps_keeps_live_writers_and_other_files(tmp_path):
    mine = tmp_path / f".x.json.{os.getpid()}.0123abcd{TMP_SUFFIX}"      # this (live) process's
    mine.write_text("in progress")
    (tmp_path / ".x.json.tmp").write_text("someone else's")
    (tmp_path / f"x{TMP_SUFFIX}").write_text("not of the pattern")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    time.sleep(0.1)
    stale = tmp_path / f".x.json.{dead}.89abcdef{TMP_SUFFIX}"
    stale.write_text("left by a killed run")
    assert remove_stale_temps(tmp_path) == [str(stale)]
    assert mine.exists() and (tmp_path / ".x.json.tmp").exists() and (tmp_path / f"x{TMP_SUFFIX}").exists()


@pytest.mark.parametrize("writer", ["scores", "plan", "bench"])
def test_pockc_writers_are_atomic(tmp_path, monkeypatch, writer):
    """The scores cache / LayerScores.to_json, UpdatePlan.to_json and the benchmark writer go
    through atomic_write: a failure mid-write leaves the previous file."""
    import pockc
    from pockc.bench import write_results
    target = tmp_path / ("out.json" if writer != "bench" else "res.json")
    target.write_text("previous\n")
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        if writer == "scores":
            pockc.LayerScores({("a", "full"): 0.5}).to_json(target)
        elif writer == "plan":
            pockc.UpdatePlan({"w": "full"}, {"w": (2, 2)}).to_json(target)
        else:
            write_results(tmp_path, "res", {"rows": []}, "# table\n")
    monkeypatch.undo()
    assert target.read_text() == "previous\n" and _temps(tmp_path) == []
