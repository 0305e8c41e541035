"""What a training run holds while it runs: a lock on its output folder, and a stop-signal handler.

Lock. Two runs writing into one ``output_dir`` would interleave their files: run A's
``latest.pdparams`` beside run B's ``latest.pdstates``, two logs in one ``train.log``. The first
run holds ``output_dir/.lock`` with ``fcntl.flock`` until it ends; a second one stops before
writing anything, with one line naming the folder and the pid that holds it. The kernel drops the
lock when its process ends, however it ends (SIGKILL, power cut on a local disk), so a crashed run
never leaves a stale lock to clean up. The file itself stays: deleting it would let a third run
lock a fresh file of the same name while the second still holds the old one. Only rank 0 locks:
the other ranks of a multi-device run are the same run.

Stop. A scheduler (Slurm, Kubernetes, a cloud preemption) ends a job with SIGTERM, then SIGKILL
after a grace period of typically 30 s. The handler only records the signal; the loop looks at it
between steps (all ranks agree in the step's first all-reduce, so they stop at the same step),
abandons the epoch in progress and ends. A save in progress is never interrupted, since the handler
raises nothing. Checkpoints are taken at epoch ends, so ``latest`` then holds the last finished
epoch, and resuming from it replays the abandoned epoch exactly (the seed tree is per epoch).
SIGINT (Ctrl-C) is handled the same way once; a second Ctrl-C interrupts at once, as usual.
"""
import contextlib
import errno
import gc
import fcntl
import os
import signal
import threading
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".lock"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received = []  # names of the stop signals received during the current run, in order


class RunStopped(Exception):
    """A stop signal arrived; the loop ended at a step boundary. ``signal`` is its name."""

    def __init__(self, name, where):
        self.signal = name
        super().__init__(f"stopped by {name} during {where}")


def stop_requested():
    """The name of the first stop signal received during this run, or None."""
    return _received[0] if _received else None


def check_stop(where):
    """Raise ``RunStopped`` if a stop signal arrived (used where ranks need not agree)."""
    if _received:
        raise RunStopped(_received[0], where)


def _on_signal(signum, frame):
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and _received:
        raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
    _received.append(name)


@contextlib.contextmanager
def run_guard(output_dir, rank=0):
    """Hold ``output_dir``'s lock (rank 0) and turn SIGTERM/SIGINT into a stop between steps."""
    lock = _acquire(Path(output_dir)) if rank == 0 else None
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only there may handlers change
        previous = {s: signal.signal(s, _on_signal) for s in _STOP_SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        # Backstop for data/loader.iterate: a loader iterator still in a reference cycle is shut
        # down now, not at interpreter exit, where multiprocessing would SIGTERM its workers,
        # which ignore that (data/loader.py), and wait for them forever.
        gc.collect()
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()
        if lock is not None:
            lock.close()  # closing the descriptor releases the flock


def _acquire(folder):
    """Open and flock ``folder/.lock``; a held lock is a ``ConfigError`` naming folder and pid."""
    folder.mkdir(parents=True, exist_ok=True)  # an error names the folder (engine/cli.py)
    path = folder / LOCK_NAME
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError("Global.output_dir", f"{folder} is in use by another training run "
                              f"(pid {holder} holds {path}); wait for it to end, stop it, or set "
                              "Global.output_dir to another folder") from None
        # A filesystem without locks (some network and FUSE mounts): run unprotected, and say so.
        print(f"warning: cannot lock {path} ({exc.strerror}); nothing stops a second run from "
              "writing into the same Global.output_dir", flush=True)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
