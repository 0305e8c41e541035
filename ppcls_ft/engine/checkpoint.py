"""Checkpoints: PaddleClas file names, atomic writes, and resume of everything.

``{prefix}.pdparams`` holds the model weights (always the raw model, never EMA — PaddleClas swaps
them when EMA is on), ``.pdopt`` the optimizer state including the LR schedule, ``.pdstates`` the
loop state (epoch, global step, best metric, history, config), ``.pdema`` the EMA weights if used.

A save is two phases. First every file is written to a temporary name in the same folder and
fsynced; a failure there (disk full, file too large, read-only folder) removes the temporary files
and leaves every final file as it was. Then the temporary files are renamed over the final names,
``.pdstates`` last. A rename needs no space, so only a kill can stop that phase; to keep the set
consistent even then, ``.pdstates`` records the size and CRC-32 of each sibling it was saved with
(``files``), and reading a checkpoint whose files do not match completes the interrupted save from
the temporary files a kill leaves behind, or refuses it by name. Errors name the final file.

``.pdstates`` layout (format 2): ``{format, train_state (engine.train_state.TrainState),
lr_scheduler, batch_op, scaler, config, steps_per_epoch, metric, epoch}``; ``metric``/``epoch`` repeat the best top-1
and the epoch under the names PaddleClas's own ``.pdstates`` uses, so its tools read ours.
``load_checkpoint`` also reads format 1 (ppcls_ft 0.1) and PaddleClas's layout (``.pdopt`` a list
of optimizer state dicts, ``.pdstates`` only ``{metric, epoch}``).
"""
import glob
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import paddle

from ..errors import WeightsError
from ..utils import portable_save
from ..utils.atomic_io import fsync_dir, fsync_file, named_os_errors, remove_quietly
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
    """Write ``prefix.{pdparams,pdopt,pdema,pdstates}`` as one set; returns the written paths."""
    prefix = strip_suffix(prefix)
    folder = Path(prefix).parent
    folder.mkdir(parents=True, exist_ok=True)  # a failure names the folder already
    parts = {".pdparams": model_state, ".pdopt": opt_state, ".pdema": ema_state, ".pdstates": states}
    pending, record = [], {}
    try:
        for suffix in ORDER:  # phase 1: complete temporary files; no final name is touched
            obj = parts[suffix]
            if obj is None:
                continue
            final = prefix + suffix
            tmp = f"{final}.tmp{os.getpid()}"
            pending.append((tmp, final))
            if suffix == ".pdstates" and isinstance(obj, dict):
                obj = {**obj, FILES_KEY: dict(record)}
            with named_os_errors(final, tmp):
                portable_save.save(obj, tmp)  # paddle.save's format, numpy 1 readable
                record[suffix] = _seal(tmp)
        for tmp, final in pending:  # phase 2: renames, .pdstates last
            with named_os_errors(final, tmp):
                os.replace(tmp, final)
        fsync_dir(folder)
        # What an earlier save of this name left when killed is superseded now; without this a
        # job preempted during saves would pile up model-sized files. (Two processes saving one
        # name at once is what the output_dir lock rules out.)
        for suffix in ORDER:
            for stale in glob.glob(glob.escape(prefix + suffix) + ".tmp*"):
                remove_quietly(stale)
    finally:
        for tmp, _ in pending:
            remove_quietly(tmp)
    return [final for _, final in pending]


FILES_KEY = "files"  # in .pdstates: {suffix: [size, crc32]} of the files saved with it


def _seal(path):
    """fsync ``path`` and return ``[size, crc32]`` of what is on disk."""
    fsync_file(path)
    return _digest(path)


def _digest(path):
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):  # 4 MiB reads: CRC-32 runs at memory speed, ~1 GB/s
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return [size, crc]


def _mismatched(prefix, record):
    """Suffixes whose file is missing or differs from ``record``."""
    return [s for s, want in record.items()
            if not os.path.isfile(prefix + s) or _digest(prefix + s) != list(want)]


def _complete_interrupted_save(prefix):
    """Finish a save killed between its renames: a kill runs no cleanup, so its temporary
    files remain; a ``.pdstates.tmp*`` whose record matches, file by file, either the final file
    or the temporary one of the same save is renamed into place with them. True if done."""
    for states_tmp in sorted(glob.glob(glob.escape(prefix) + ".pdstates.tmp*")):
        tag = states_tmp[len(prefix + ".pdstates"):]
        try:
            record = dict(safe_load(states_tmp).get(FILES_KEY) or {})
        except Exception:  # noqa: BLE001 - a temporary file cut short by the kill: not this one
            continue
        moves = []
        for suffix, want in record.items():
            tmp = prefix + suffix + tag
            if os.path.isfile(tmp) and _digest(tmp) == list(want):
                moves.append((tmp, prefix + suffix))
            elif not (os.path.isfile(prefix + suffix) and _digest(prefix + suffix) == list(want)):
                break
        else:
            for src, dst in moves + [(states_tmp, prefix + ".pdstates")]:
                os.replace(src, dst)
            fsync_dir(os.path.dirname(prefix) or ".")
            return True
    return False


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
    states_path = prefix + ".pdstates"
    record = _files_record(states_path)
    if record and _mismatched(prefix, record) and _complete_interrupted_save(prefix):
        record = _files_record(states_path)
    bad = _mismatched(prefix, record) if record else []
    if bad:
        raise WeightsError(f"Global.checkpoints: {', '.join(prefix + s for s in bad)} missing or "
                           f"not the file(s) saved with {states_path} (cut short by a copy, "
                           "replaced, or a save killed between its renames); resume from another "
                           "checkpoint of this run, e.g. the newest epoch_N")
    parts = {}
    for suffix in ORDER:
        path = prefix + suffix
        if not os.path.isfile(path) or (record and suffix not in record and suffix != ".pdstates"):
            parts[suffix[3:]] = None  # absent, or left over from an earlier save of this name
        elif suffix in (".pdparams", ".pdema"):
            parts[suffix[3:]] = load_pdparams(path)
        else:
            parts[suffix[3:]] = unwrap_tensors(safe_load(path))
    if parts["opt"] is None or parts["states"] is None:
        raise WeightsError(f"Global.checkpoints: {prefix} has weights but no .pdopt/.pdstates; to only "
                           f"load weights use Global.pretrained_model={prefix}")
    if isinstance(parts["states"], dict):
        parts["states"].pop(FILES_KEY, None)
    return {"params": parts["params"], "opt": parts["opt"], "ema": parts["ema"], "states": parts["states"]}


def _files_record(states_path):
    """The ``files`` record of a ``.pdstates`` (None for PaddleClas's and older ones)."""
    if not os.path.isfile(states_path):
        return None
    st = safe_load(states_path)
    return dict(st[FILES_KEY]) if isinstance(st, dict) and isinstance(st.get(FILES_KEY), dict) else None
