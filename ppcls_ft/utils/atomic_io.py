"""Writes that either complete under their final name or leave the previous file untouched, and
whose errors name the file.

Why the naming: ``write()``/``flush()``/``fsync()`` failures (ENOSPC "No space left on device",
EFBIG "File too large", EIO) raise an ``OSError`` whose ``filename`` is None, so the user would
read "[Errno 28] No space left on device" without knowing where. ``named_os_errors`` re-raises
such an error as the same ``OSError`` subclass with the path filled in; ``engine/cli.py`` then
prints it as one line with the config key that holds the path.
"""
import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def named_os_errors(path, tmp=None):
    """Re-raise an ``OSError`` that names no file, or names ``tmp`` (the temporary file the user
    never configured), as the same error naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename not in (None, tmp and str(tmp)):
            raise
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    """Make renames inside ``path`` durable (a power cut otherwise may undo them). Some
    filesystems cannot fsync a folder (EINVAL); the renames are then as durable as they get."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path):
    """Remove a temporary file if it is there. Called while another error propagates, so a
    failure here (a read-only folder) is swallowed: that first error is the one to report, and
    a leftover temporary file harms nothing (the next save of that name replaces it)."""
    if os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def write_text_atomic(path, text):
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with named_os_errors(path, tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
    return path
