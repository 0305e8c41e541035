"""Console + ``train.log`` logging and VisualDL scalars behind one writer.

The VisualDL tags are the names in the printed log line with a ``train_`` or ``eval_`` prefix
(``train_lr``, ``train_loss``, ``train_CELoss``, ``train_top1``, ``train_ips``, ``eval_loss``,
``eval_top1``, ``eval_ema_top1`` ...), so a value seen in one is found in the other. PaddleClas
tags the learning rate with the scheduler class (``lr(LinearWarmup)``), which changes between
configs; ours is always ``train_lr``. Train scalars are stepped by global iteration, eval
scalars by epoch.
"""
import datetime
import logging
import sys
from pathlib import Path

LOGGER_NAME = "ppcls_ft"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (pytest and notebooks swap it between runs)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _LogFileHandler(logging.FileHandler):
    """``train.log``. A failed write (disk full, file too large) is reported once, in one line on
    the console, and the log goes on there; logging's default prints a traceback per record."""

    _reported = False

    def handleError(self, record):
        if not self._reported:
            self._reported = True
            print(f"warning: cannot write the log file {self.baseFilename}: {sys.exc_info()[1]}; "
                  "logging continues on the console only", file=sys.stdout, flush=True)


def get_logger(output_dir=None, rank=0, filename="train.log"):
    """The ``ppcls_ft`` logger: INFO to stdout on rank 0 and to ``output_dir/filename``."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y/%m/%d %H:%M:%S")
    if not any(getattr(h, "_ppcls_console", False) for h in logger.handlers):
        console = _StdoutHandler()
        console.setFormatter(fmt)
        console._ppcls_console = True
        logger.addHandler(console)
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = _LogFileHandler(Path(output_dir) / filename, mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class ScalarWriter:
    """Writes scalars to VisualDL when enabled; a no-op otherwise (and on ranks other than 0)."""

    def __init__(self, logdir=None, enabled=False, rank=0):
        self._writer = None
        if enabled and rank == 0:
            from visualdl import LogWriter  # imported only when asked for: it is slow to import
            self._writer = LogWriter(logdir=str(logdir))
        self.logdir = logdir if self._writer else None

    def add_scalars(self, values, step, prefix=""):
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag=f"{prefix}{name}", value=float(value), step=int(step))

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def format_values(values, precision=5):
    """``{'CELoss': 1.2, 'loss': 1.2}`` -> ``'CELoss: 1.20000, loss: 1.20000'`` (None left out)."""
    return ", ".join(f"{k}: {v:.{precision}f}" for k, v in values.items() if v is not None)
