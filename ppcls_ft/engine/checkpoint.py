"""Checkpoints: PaddleClas file names, atomic writes, and resume of everything.

``{prefix}.pdparams`` holds the model weights (always the raw model, never EMA — PaddleClas swaps
them when EMA is on), ``.pdopt`` the optimizer state including the LR schedule, ``.pdstates`` the
loop state (epoch, global step, best metric, history, config), ``.pdema`` the EMA weights if used.

Each file is written to a temporary name in the same folder and renamed over the final name, so a
kill during a save leaves either the previous complete file or the new one, never a truncated one.
``.pdstates`` is renamed last: it is what marks a checkpoint as complete for resume.

``.pdstates`` layout (format 2): ``{format, train_state (engine.train_state.TrainState),
lr_scheduler, batch_op, scaler, config, steps_per_epoch, metric, epoch}``; ``metric``/``epoch`` repeat the best top-1
and the epoch under the names PaddleClas's own ``.pdstates`` uses, so its tools read ours.
``load_checkpoint`` also reads format 1 (ppcls_ft 0.1) and PaddleClas's layout (``.pdopt`` a list
of optimizer state dicts, ``.pdstates`` only ``{metric, epoch}``).
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

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


FORMAT = 2
_V1_STATE_KEYS = ("epoch", "global_step", "best_top1", "best_epoch", "history", "seed")


@dataclass
class Checkpoint:
    """A checkpoint read from disk, whichever program wrote it, in one layout."""
    params: dict
    opt: dict
    ema: dict = None
    train_state: dict = None     # TrainState.state_dict() layout
    extras: dict = field(default_factory=dict)   # lr_scheduler, batch_op, scaler (when saved)
    config: dict = None
    source: str = "ppcls_ft"
    notes: list = field(default_factory=list)    # what could not be restored, in words


def float32_state(model):
    """``model``'s state with low-precision floats cast to float32.

    Checkpoints are always float32 (AMP O2 keeps fp16/bf16 weights): PaddleClas, a non-AMP resume
    and ``Global.pretrained_model`` then load them unchanged. Explicit rather than relying on
    ``paddle.amp.decorate(save_dtype=...)`` hooks, so it holds for any model.
    """
    out = {}
    for key, value in model.state_dict().items():
        if value.dtype in (paddle.float16, paddle.bfloat16):
            value = value.astype("float32")
        out[key] = value
    return out


def build_states(train_state, *, lr_scheduler=None, batch_op=None, scaler=None, config=None,
                 steps_per_epoch=None):
    """The ``.pdstates`` payload (format 2)."""
    return {"format": FORMAT, "train_state": train_state.state_dict(),
            "lr_scheduler": lr_scheduler, "batch_op": batch_op, "scaler": scaler, "config": config,
            "steps_per_epoch": steps_per_epoch,
            "metric": train_state.best_top1, "epoch": train_state.epoch}


def read_checkpoint(prefix, steps_per_epoch=None, seed=0):
    """Read any supported checkpoint into a ``Checkpoint`` (see the module docstring).

    ``steps_per_epoch`` and ``seed`` (this run's) fill in what a PaddleClas checkpoint lacks.
    """
    raw = load_checkpoint(prefix)
    prefix = strip_suffix(prefix)
    st, opt = raw["states"], raw["opt"]
    if isinstance(opt, (list, tuple)):  # PaddleClas: one state dict per optimizer
        if len(opt) != 1:
            raise WeightsError(f"Global.checkpoints: {prefix}.pdopt holds {len(opt)} optimizers; "
                               "ppcls_ft trains with one")
        opt = opt[0]
    if not isinstance(st, dict) or not isinstance(opt, dict):
        raise WeightsError(f"Global.checkpoints: {prefix}.pdstates/.pdopt are not mappings; "
                           "not a PaddleClas or ppcls_ft checkpoint")
    if st.get("format") == FORMAT:
        return Checkpoint(raw["params"], opt, raw["ema"], st["train_state"],
                          {k: st.get(k) for k in ("lr_scheduler", "batch_op", "scaler",
                                                  "steps_per_epoch")},
                          st.get("config"))
    if all(k in st for k in _V1_STATE_KEYS):  # ppcls_ft 0.1
        state = {k: st[k] for k in _V1_STATE_KEYS} | {"strategy": {}}
        return Checkpoint(raw["params"], opt, raw["ema"], state,
                          {"lr_scheduler": st.get("lr_scheduler"), "batch_op": st.get("batch_op")},
                          st.get("config"), source="ppcls_ft 0.1")
    if "epoch" in st:  # PaddleClas: {metric, epoch}; the LR schedule lives in the .pdopt
        epoch = int(st["epoch"])
        steps = epoch * int(steps_per_epoch or 0)
        state = {"epoch": epoch, "global_step": steps, "best_top1": float(st.get("metric", -1.0)),
                 "best_epoch": None, "history": [], "seed": int(seed), "strategy": {}}
        notes = [f"its .pdstates metric {state['best_top1']:.5f} taken as the best top-1 so far",
                 "no history, seed tree or batch-operator state (PaddleClas does not save them): "
                 "random draws restart from Global.seed",
                 f"optimizer steps taken derived as epoch x steps per epoch = {steps}"]
        params, ema = raw["params"], raw["ema"]
        if ema is not None:  # PaddleClas's save_model puts EMA in .pdparams, the model in .pdema
            params, ema = ema, params
            notes.append("its .pdparams (EMA weights) and .pdema (model) read the other way round")
        return Checkpoint(params, opt, ema, state, {}, None, "PaddleClas", notes)
    raise WeightsError(f"Global.checkpoints: {prefix}.pdstates has keys {sorted(st)[:8]}, which "
                       "neither ppcls_ft nor PaddleClas writes")


def load_checkpoint(prefix):
    """Read the raw files of a checkpoint (ppcls_ft or PaddleClas); returns a dict of parts.

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
