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
from .checkpoint import read_checkpoint, strip_suffix
from .train_state import check_compatible


def resume_source(glob, output_dir, log):
    """This run's own ``latest`` when ``Global.auto_resume`` is on and it exists (a restarted
    job continues where it stopped, even if ``Global.checkpoints`` names where it began), else
    ``Global.checkpoints``, else None. Every rank must see the file, or every rank stops."""
    if glob.get("auto_resume"):
        latest = os.path.join(output_dir, "latest")
        if _visible(latest + ".pdstates", "Global.auto_resume"):
            return latest
        log.info(f"Global.auto_resume: no {latest}.pdstates yet; "
                 + (f"starting from Global.checkpoints={glob['checkpoints']}"
                    if glob.get("checkpoints") else "starting from epoch 1"))
    prefix = glob.get("checkpoints")
    if prefix:
        _visible(strip_suffix(prefix) + ".pdparams", "Global.checkpoints", required=True)
    return prefix


def _visible(path, key, required=False):
    """True when every rank sees ``path``; False when none does (an error if ``required``)."""
    found = int(dist.all_sum([os.path.isfile(path)])[0])
    if 0 < found < dist.world_size():
        raise ConfigError(key, f"{path} is visible on {found} of {dist.world_size()} ranks; put "
                               "Global.output_dir / the checkpoint on storage every node shares")
    if required and not found:
        raise ConfigError(key, f"no checkpoint at {path}; point it at e.g. output/latest")
    return found > 0


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
    seed = state.seed
    state.load_state_dict(ck.train_state, f"{prefix}.pdstates")
    if state.seed != seed:  # the loader's item seeds come from Global.seed: they must agree
        raise ConfigError("Global.seed", f"is {seed} but {prefix} was trained with seed "
                                         f"{state.seed}; resume with Global.seed={state.seed}")
    extras = ck.extras
    if extras.get("lr_scheduler"):
        p.lr_scheduler.set_state_dict(extras["lr_scheduler"])
    _reposition_schedule(p, state, extras.get("steps_per_epoch"), ck.notes)
    if p.ema is not None and ck.ema is not None:
        p.ema.set_state_dict(ck.ema)
    elif p.ema is not None:
        p.ema.reset(model)
        ck.notes.append("no .pdema: EMA restarts from the resumed weights")
    if p.batch_op is not None and extras.get("batch_op"):
        p.batch_op.set_state_dict(extras["batch_op"])
    if p.scaler is not None and extras.get("scaler"):
        p.scaler.load_state_dict(extras["scaler"])
    log.info(f"resumed from {prefix} ({ck.source}): epoch {state.epoch}, step {state.global_step}, "
             f"best top1 {state.best_top1:.5f}, lr {float(p.optimizer.get_lr()):.8f}")
    if ck.notes:
        log.warning(f"resume from {prefix}: " + "; ".join(ck.notes))


def _reposition_schedule(p, state, saved_steps, notes):
    """Another world size, batch or update_freq changes the optimizer steps per epoch; the
    schedule then continues from ``epoch x new steps per epoch``, not the old step count."""
    if saved_steps is None or int(saved_steps) == p.steps_per_epoch:
        return
    step = state.epoch * p.steps_per_epoch
    notes.append(f"optimizer steps per epoch changed from {saved_steps} to {p.steps_per_epoch} "
                 f"(world size, batch size or update_freq); the LR schedule continues from step "
                 f"{step} (epoch {state.epoch} of the new schedule)")
    state.global_step = step
    p.lr_scheduler.step(step)
