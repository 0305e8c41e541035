"""Capture what a library prints, C++ side included, to show it only when something fails.

``contextlib.redirect_stdout`` only swaps Python's ``sys.stdout``; paddle2onnx's converter writes
to file descriptors 1 and 2 from C++, so this redirects the descriptors themselves into a
temporary file (written by hand because no standard-library or well-kept helper redirects file
descriptors).
"""
import contextlib
import os
import sys
import tempfile


class _Captured:
    def __init__(self, file):
        self._file = file

    def text(self):
        self._file.flush()
        self._file.seek(0)
        return self._file.read().decode("utf-8", "replace")


@contextlib.contextmanager
def captured_output():
    """Within the block, fds 1 and 2 (and ``sys.stdout``/``sys.stderr``) go to a temporary file;
    the yielded object's ``text()`` returns what was written. Restored on exit, also on error."""
    with tempfile.TemporaryFile() as tmp:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            # text streams on the redirected descriptors, complete (fileno, isatty, encoding)
            with open(1, "w", closefd=False) as out, open(2, "w", closefd=False) as err, \
                    contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield _Captured(tmp)
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
