"""Atomic file writes: a reader (or the next run) sees the old file or the new one, never a part.

:func:`atomic_write` writes the data to a temporary file in the target's own directory, flushes and
``fsync``\\ s it, gives it the permissions a plain ``open(path, "w")`` would (an existing file's
mode, else ``0o666`` less the umask), ``os.replace``\\ s it over the target and ``fsync``\\ s the
directory so that the rename itself is durable. A process killed at any point leaves the previous
file intact; at worst a temporary file ``.NAME.PID.XXXXXXXX.pockc-tmp`` stays behind, which
:func:`remove_stale_temps` deletes once its writer is gone.

Every file pockc writes goes through here (the scores cache, plan.json, report.txt, train_step.py,
benchmark results). This module imports only the standard library; it is part of pockc's runtime.
"""
from __future__ import annotations

import errno
import os
import secrets

TMP_SUFFIX = ".pockc-tmp"
_NAME_MAX = 96          # characters of the target's name kept in the temporary file's name


def _temp_name(directory: str, base: str) -> str:
    return os.path.join(directory, f".{base[:_NAME_MAX]}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(directory: str) -> None:
    """fsync a directory (makes a rename or unlink in it durable); a no-op where unsupported."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:        # some filesystems cannot fsync a directory: nothing more to do
        pass
    finally:
        os.close(fd)


def atomic_write(path, data) -> str:
    """Write ``data`` (``str``, encoded as UTF-8, or bytes) to ``path`` atomically; returns the path
    written (a symlink's target: the link is kept, as a plain ``open`` would). Raises ``OSError``
    (the target untouched, no temporary file left) when it cannot."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise TypeError(f"atomic_write takes str or bytes, not {type(data).__name__}")
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    directory, base = os.path.split(os.path.abspath(path))
    if not base:
        raise IsADirectoryError(errno.EISDIR, "not a file name", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = None
    tmp = _temp_name(directory, base)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True          # exists (another user's) or cannot tell: keep its file
    return True


def remove_stale_temps(directory) -> list:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` when its process was
    killed (only names of its own pattern, and only once that process is gone); returns them."""
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for name in entries:
        if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
            continue
        parts = name[: -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 8:
            continue
        if _pid_alive(int(parts[1])):
            continue
        full = os.path.join(directory, name)
        try:
            if os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
                removed.append(full)
        except OSError:
            pass
    return removed
