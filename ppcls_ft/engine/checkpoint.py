"""Checkpoints: PaddleClas file names, atomic writes, and resume of everything.

``{prefix}.pdparams`` holds the model weights (always the raw model, never EMA — PaddleClas swaps
them when EMA is on), ``.pdopt`` the optimizer state including the LR schedule, ``.pdstates`` the
loop state (epoch, global step, best metric, history, config), ``.pdema`` the EMA weights if used.

Each file is written to a temporary name in the same folder and renamed over the final name, so a
kill during a save leaves either the previous complete file or the new one, never a truncated one.
``.pdstates`` is renamed last: it is what marks a checkpoint as complete for resume.
"""
import os
from pathlib import Path

import numpy as np
import paddle

from ..errors import WeightsError
from ..utils import portable_save
from ..utils.safe_pickle import load_pdparams, safe_load, unwrap_tensors

ORDER = (".pdparams", ".pdopt", ".pdema", ".pdstates")


def strip_suffix(prefix):
    """``output/epoch_2.pdparams`` and ``output/epoch_2`` both name the checkpoint ``output/epoch_2``."""
    prefix = str(prefix)
    for suffix in ORDER:
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def save_checkpoint(prefix, model_state, opt_state=None, states=None, ema_state=None):
    """Write ``prefix.{pdparams,pdopt,pdema,pdstates}`` atomically; returns the written paths."""
    prefix = strip_suffix(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    parts = {".pdparams": model_state, ".pdopt": opt_state, ".pdema": ema_state, ".pdstates": states}
    written = []
    tmp_paths = []
    try:
        for suffix in ORDER:
            if parts[suffix] is None:
                continue
            tmp = f"{prefix}{suffix}.tmp{os.getpid()}"
            tmp_paths.append((tmp, prefix + suffix))
            portable_save.save(parts[suffix], tmp)  # paddle.save's format, numpy 1 readable
            _fsync(tmp)
        for tmp, final in tmp_paths:
            os.replace(tmp, final)
            written.append(final)
    finally:
        for tmp, _ in tmp_paths:
            if os.path.exists(tmp):
                os.remove(tmp)
    return written


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_checkpoint(prefix):
    """Read a checkpoint written by ``save_checkpoint`` (or PaddleClas); returns a dict of parts.

    Files are read with the restricted unpickler: a checkpoint cannot run code when resumed.
    """
    prefix = strip_suffix(prefix)
    if not os.path.isfile(prefix + ".pdparams"):
        raise WeightsError(f"Global.checkpoints: no checkpoint at {prefix!r} "
                           f"({prefix}.pdparams does not exist); point it at e.g. output/latest")
    parts = {}
    for suffix in ORDER:
        path = prefix + suffix
        if not os.path.isfile(path):
            parts[suffix[3:]] = None
        elif suffix in (".pdparams", ".pdema"):
            parts[suffix[3:]] = load_pdparams(path)
        else:
            parts[suffix[3:]] = unwrap_tensors(safe_load(path))
    if parts["opt"] is None or parts["states"] is None:
        raise WeightsError(f"Global.checkpoints: {prefix} has weights but no .pdopt/.pdstates; to only "
                           f"load weights use Global.pretrained_model={prefix}")
    return {"params": parts["params"], "opt": parts["opt"], "ema": parts["ema"], "states": parts["states"]}


def to_tensors(tree):
    """numpy arrays -> paddle Tensors, recursively (optimizer.set_state_dict wants Tensors)."""
    if isinstance(tree, dict):
        return {k: to_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_tensors(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return paddle.to_tensor(tree)
    return tree
