"""Where a run resumes from, and restoring every part of it from a checkpoint.

``Global.checkpoints`` names a checkpoint prefix; with ``Global.auto_resume: True`` a run
resumes from its own ``output_dir/latest`` when that exists, so a restarted job (a scheduler
re-running the same command, an elastic restart) continues without a config edit. Restoring is
strict for our checkpoints (weights, optimizer state and train state must fit exactly) and
restores what fits of a PaddleClas checkpoint, saying the rest in one line.
"""
import os

from ..errors import ConfigError
from ..models._builder import load_state_exact
from ..optim.optimizer import load_optimizer_state
from ..utils import distributed as dist
from .checkpoint import read_checkpoint
from .train_state import check_compatible


def resume_source(glob, output_dir, log):
    """``Global.checkpoints``, or with ``Global.auto_resume`` this run's own ``latest``."""
    if glob.get("checkpoints"):
        return glob["checkpoints"]
    if not glob.get("auto_resume"):
        return None
    latest = os.path.join(output_dir, "latest")
    found = int(dist.all_sum([os.path.isfile(latest + ".pdstates")])[0])
    if found == 0:
        log.info(f"Global.auto_resume: no {latest}.pdstates yet; starting from epoch 1")
        return None
    if found < dist.world_size():
        raise ConfigError("Global.auto_resume", f"{latest}.pdstates is visible on {found} of "
                          f"{dist.world_size()} ranks; put Global.output_dir on storage every node "
                          "shares")
    return latest


def restore(parts, model, state, prefix, log):
    """Load checkpoint ``prefix`` into ``model`` (unwrapped), the optimizer, ``state``
    (TrainState), the LR schedule, EMA, batch operator and loss scaler."""
    p = parts
    ck = read_checkpoint(prefix, p.steps_per_epoch, seed=state.seed)
    check_compatible(ck.config, p.cfg, f"Global.checkpoints={prefix}")
    load_state_exact(model, ck.params, f"{prefix}.pdparams")
    note = load_optimizer_state(p.optimizer, ck.opt, f"{prefix}.pdopt",  # + its LR schedule
                                strict=ck.source != "PaddleClas")
    ck.notes += [note] if note else []
    state.load_state_dict(ck.train_state, f"{prefix}.pdstates")
    extras = ck.extras
    if extras.get("lr_scheduler"):
        p.lr_scheduler.set_state_dict(extras["lr_scheduler"])
    if p.ema is not None and ck.ema is not None:
        p.ema.set_state_dict(ck.ema)
    elif p.ema is not None:
        ck.notes.append("no .pdema: EMA restarts from the resumed weights")
    if p.batch_op is not None and extras.get("batch_op"):
        p.batch_op.set_state_dict(extras["batch_op"])
    if p.scaler is not None and extras.get("scaler"):
        p.scaler.load_state_dict(extras["scaler"])
    log.info(f"resumed from {prefix} ({ck.source}): epoch {state.epoch}, step {state.global_step}, "
             f"best top1 {state.best_top1:.5f}, lr {float(p.optimizer.get_lr()):.8f}")
    if ck.notes:
        log.warning(f"resume from {prefix}: " + "; ".join(ck.notes))
