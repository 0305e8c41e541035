"""Learning-rate schedules of the PaddleClas YAML (``Optimizer.lr``), stepped once per optimizer step.

Every schedule is a ``paddle.optimizer.lr.LRScheduler`` whose ``get_lr`` is a closed form of the
global optimizer-step counter ``t`` (Paddle's ``last_epoch``), so ``state_dict`` (``last_epoch``,
``last_lr``) restores the exact position on resume. Warmup is shared: for ``t < W`` with
``W = round(warmup_epoch * steps_per_epoch)`` the lr rises linearly from ``warmup_start_lr`` to the
schedule's first value; from then on the main schedule runs on its own clock ``t' = t - W``
(formulas: ``shared/guide/PADDLECLAS_COMPAT.md`` section 5). ``steps_per_epoch`` is already
``iters_per_epoch // update_freq``; the caller passes it with ``epochs``.

PaddleClas wraps a warmed-up schedule in ``LinearWarmup`` and logs it as ``lr(LinearWarmup)``; ours
keep their own ``name`` and log under the stable tag ``LR_TAG = "lr"``.

Keys every schedule takes besides its own: ``warmup_epoch`` (may be fractional),
``warmup_start_lr``, ``by_epoch`` (PaddleClas spelling: hold the lr constant within an epoch, i.e.
evaluate the formula at the epoch's first step) and ``last_epoch`` (Paddle's resume index, in steps).
"""
import logging
import math
from typing import Optional

from paddle.optimizer.lr import LRScheduler

from ..errors import ConfigError
from ..registry import LR_SCHEDULERS

LR_TAG = "lr"  # VisualDL scalar tag and log-line key, whatever the schedule
_LOG = logging.getLogger("ppcls_ft")


def _check(ok, key, msg):
    if not ok:
        raise ConfigError(key, msg)


class WarmupSchedule(LRScheduler):
    """Linear warmup followed by a main schedule ``main_lr(t')``; subclasses define ``main_lr``.

    ``last_epoch`` counts optimizer steps (Paddle's name, kept so Paddle's state_dict works).
    """

    def __init__(self, learning_rate: float, epochs: int, steps_per_epoch: int,
                 warmup_epoch: float = 0, warmup_start_lr: float = 0.0, by_epoch: bool = False,
                 last_epoch: int = -1):
        _check(isinstance(epochs, int) and epochs > 0, "epochs",
               f"must be a positive int, got {epochs!r}")
        _check(isinstance(steps_per_epoch, int) and steps_per_epoch > 0, "steps_per_epoch",
               f"optimizer steps per epoch (iterations per epoch // update_freq) is "
               f"{steps_per_epoch!r}; lower update_freq or the batch size, or use more data")
        _check(learning_rate >= 0, "learning_rate", f"must be >= 0, got {learning_rate}")
        _check(warmup_start_lr >= 0, "warmup_start_lr", f"must be >= 0, got {warmup_start_lr}")
        _check(0 <= warmup_epoch < epochs, "warmup_epoch",
               f"must be >= 0 and smaller than Global.epochs ({epochs}), got {warmup_epoch}; "
               f"lower warmup_epoch or raise epochs")
        self.name = type(self).__name__
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = int(round(warmup_epoch * steps_per_epoch))
        self.warmup_start_lr = float(warmup_start_lr)
        self.by_epoch = bool(by_epoch)
        super().__init__(float(learning_rate), last_epoch, False)

    # -- the schedule -----------------------------------------------------------------------
    def main_lr(self, t):
        """lr of the main schedule at post-warmup step ``t >= 0``."""
        raise NotImplementedError

    def lr_at_step(self, t):
        """Closed-form lr the optimizer uses at global optimizer step ``t`` (0-based)."""
        t = max(int(t), 0)
        if self.by_epoch:  # PaddleClas by_epoch: the lr changes only at epoch starts
            t -= t % self.steps_per_epoch
        if t < self.warmup_steps:
            end = self.main_lr(0)
            return self.warmup_start_lr + (end - self.warmup_start_lr) * t / self.warmup_steps
        return self.main_lr(t - self.warmup_steps)

    def get_lr(self):
        return self.lr_at_step(self.last_epoch)

    def __repr__(self):
        return (f"{self.name}(base_lr={self.base_lr}, warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}, step={self.last_epoch})")


@LR_SCHEDULERS.register
class Cosine(WarmupSchedule):
    """Cosine decay to ``eta_min`` over the post-warmup steps.

    YAML: ``lr: {name: Cosine, learning_rate: 0.1, eta_min: 0.0, warmup_epoch: 5,
    warmup_start_lr: 0.0}``. ``lr = eta_min + (lr0 - eta_min)(1 + cos(pi t'/T))/2`` with
    ``T = (epochs - warmup_epoch) * steps_per_epoch``; after ``T`` it stays at ``eta_min``.
    """

    def __init__(self, learning_rate: float, epochs: int, steps_per_epoch: int, eta_min: float = 0.0,
                 warmup_epoch: float = 0, warmup_start_lr: float = 0.0, by_epoch: bool = False,
                 last_epoch: int = -1):
        _check(eta_min >= 0, "eta_min", f"must be >= 0, got {eta_min}")
        self.eta_min = float(eta_min)
        # T uses the un-rounded warmup, as the formula says; W is rounded to whole steps.
        self.decay_steps = max((epochs - warmup_epoch) * steps_per_epoch, 1e-12)
        super().__init__(learning_rate, epochs, steps_per_epoch, warmup_epoch, warmup_start_lr,
                         by_epoch, last_epoch)

    def main_lr(self, t):
        frac = min(t / self.decay_steps, 1.0)
        return self.eta_min + (self.base_lr - self.eta_min) * (1.0 + math.cos(math.pi * frac)) / 2.0


@LR_SCHEDULERS.register
class Piecewise(WarmupSchedule):
    """Constant pieces: ``values[i]`` until ``decay_epochs[i]`` (epochs on the post-warmup clock).

    YAML: ``lr: {name: Piecewise, decay_epochs: [30, 60, 90], values: [0.1, 0.01, 0.001, 0.0001],
    warmup_epoch: 0}``. Differs from PaddleClas: when ``learning_rate`` is also set (ResNet50.yaml
    does), PaddleClas silently replaces ``decay_epochs``/``values`` by "divide by 10 every 30
    epochs"; we always follow ``decay_epochs``/``values`` and log a warning that ``learning_rate``
    is ignored. Warmup ends at ``values[0]``.
    """

    def __init__(self, decay_epochs: list, values: list, epochs: int, steps_per_epoch: int,
                 warmup_epoch: float = 0, warmup_start_lr: float = 0.0,
                 learning_rate: Optional[float] = None, by_epoch: bool = False,
                 last_epoch: int = -1):
        _check(len(values) == len(decay_epochs) + 1, "values",
               f"needs one more entry than decay_epochs ({len(decay_epochs)} boundaries -> "
               f"{len(decay_epochs) + 1} values), got {len(values)}")
        _check(all(isinstance(v, (int, float)) and v >= 0 for v in values), "values",
               f"must be non-negative numbers, got {values}")
        _check(all(isinstance(e, (int, float)) for e in decay_epochs), "decay_epochs",
               f"must be numbers of epochs, got {decay_epochs}")
        _check(all(a < b for a, b in zip(decay_epochs, decay_epochs[1:])), "decay_epochs",
               f"must be strictly increasing, got {decay_epochs}")
        if learning_rate is not None:
            _LOG.warning("Optimizer.lr: Piecewise has both learning_rate (%s) and decay_epochs/values; "
                         "following decay_epochs=%s values=%s and ignoring learning_rate "
                         "(PaddleClas would replace them by /10 every 30 epochs)",
                         learning_rate, list(decay_epochs), list(values))
        self.values = [float(v) for v in values]
        self.decay_epochs = list(decay_epochs)
        self.boundaries = [int(round(e * steps_per_epoch)) for e in decay_epochs]
        super().__init__(self.values[0], epochs, steps_per_epoch, warmup_epoch, warmup_start_lr,
                         by_epoch, last_epoch)

    def main_lr(self, t):
        return self.values[sum(1 for b in self.boundaries if t >= b)]


@LR_SCHEDULERS.register
class Step(WarmupSchedule):
    """Multiply by ``gamma`` every ``step_size`` epochs (post-warmup clock).

    YAML: ``lr: {name: Step, learning_rate: 0.1, step_size: 30, gamma: 0.1, warmup_epoch: 0}``.
    """

    def __init__(self, learning_rate: float, step_size: int, epochs: int, steps_per_epoch: int,
                 gamma: float = 0.1, warmup_epoch: float = 0, warmup_start_lr: float = 0.0,
                 by_epoch: bool = False, last_epoch: int = -1):
        _check(step_size > 0, "step_size", f"must be a positive number of epochs, got {step_size}")
        _check(gamma > 0, "gamma", f"must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.step_steps = int(round(step_size * steps_per_epoch))
        super().__init__(learning_rate, epochs, steps_per_epoch, warmup_epoch, warmup_start_lr,
                         by_epoch, last_epoch)

    def main_lr(self, t):
        return self.base_lr * self.gamma ** (t // self.step_steps)


@LR_SCHEDULERS.register
class MultiStepDecay(WarmupSchedule):
    """Multiply by ``gamma`` at each milestone (epochs, post-warmup clock).

    YAML: ``lr: {name: MultiStepDecay, learning_rate: 0.1, milestones: [30, 60, 90], gamma: 0.1}``.
    """

    def __init__(self, learning_rate: float, milestones: list, epochs: int, steps_per_epoch: int,
                 gamma: float = 0.1, warmup_epoch: float = 0, warmup_start_lr: float = 0.0,
                 by_epoch: bool = False, last_epoch: int = -1):
        _check(len(milestones) > 0 and all(isinstance(m, (int, float)) for m in milestones),
               "milestones", f"must be a non-empty list of epochs, got {milestones}")
        _check(all(a < b for a, b in zip(milestones, milestones[1:])), "milestones",
               f"must be strictly increasing, got {milestones}")
        _check(gamma > 0, "gamma", f"must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.milestones = list(milestones)
        self.milestone_steps = [int(round(m * steps_per_epoch)) for m in milestones]
        super().__init__(learning_rate, epochs, steps_per_epoch, warmup_epoch, warmup_start_lr,
                         by_epoch, last_epoch)

    def main_lr(self, t):
        return self.base_lr * self.gamma ** sum(1 for m in self.milestone_steps if t >= m)


@LR_SCHEDULERS.register
class Linear(WarmupSchedule):
    """Polynomial decay from ``learning_rate`` to ``end_lr`` over the post-warmup steps.

    YAML: ``lr: {name: Linear, learning_rate: 0.1, end_lr: 0.0, power: 1.0, cycle: false}``.
    ``lr = (lr0 - end_lr)(1 - t'/D)^power + end_lr`` with ``D = (epochs - warmup_epoch) *
    steps_per_epoch``; without ``cycle`` ``t'`` stops at ``D``; with ``cycle`` ``D`` grows to the
    next multiple of itself that is >= ``t'`` (Paddle ``PolynomialDecay`` semantics).
    """

    def __init__(self, learning_rate: float, epochs: int, steps_per_epoch: int, end_lr: float = 0.0,
                 power: float = 1.0, cycle: bool = False, warmup_epoch: float = 0,
                 warmup_start_lr: float = 0.0, by_epoch: bool = False,
                 last_epoch: int = -1):
        _check(end_lr >= 0, "end_lr", f"must be >= 0, got {end_lr}")
        _check(power > 0, "power", f"must be > 0, got {power}")
        self.end_lr = float(end_lr)
        self.power = float(power)
        self.cycle = bool(cycle)
        self.decay_steps = max(int(round((epochs - warmup_epoch) * steps_per_epoch)), 1)
        super().__init__(learning_rate, epochs, steps_per_epoch, warmup_epoch, warmup_start_lr,
                         by_epoch, last_epoch)

    def main_lr(self, t):
        d = self.decay_steps
        if self.cycle:
            d = d * max(math.ceil(t / d), 1)
        else:
            t = min(t, d)
        return (self.base_lr - self.end_lr) * (1.0 - t / d) ** self.power + self.end_lr


@LR_SCHEDULERS.register
class ConstLR(WarmupSchedule):
    """Constant ``learning_rate`` (after the optional warmup).

    YAML: ``lr: {name: ConstLR, learning_rate: 0.01, warmup_epoch: 0}``.
    """

    def __init__(self, learning_rate: float, epochs: int, steps_per_epoch: int,
                 warmup_epoch: float = 0, warmup_start_lr: float = 0.0, by_epoch: bool = False,
                 last_epoch: int = -1):
        super().__init__(learning_rate, epochs, steps_per_epoch, warmup_epoch, warmup_start_lr,
                         by_epoch, last_epoch)

    def main_lr(self, t):
        return self.base_lr


def _reroot(err, path):
    """Re-raise a constructor's ConfigError (key relative to the section) under the full path."""
    msg = str(err)
    if err.path and msg.startswith(f"{err.path}: "):
        msg = msg[len(err.path) + 2:]
    # epochs/steps_per_epoch come from Global, not from this section
    full = {"epochs": "Global.epochs", "steps_per_epoch": "Global.update_freq"}.get(
        err.path, f"{path}.{err.path}" if err.path else path)
    return ConfigError(full, msg)


def build_lr_scheduler(lr_cfg: dict, *, epochs: int, steps_per_epoch: int,
                       path: str = "Optimizer.lr") -> LRScheduler:
    """Build the ``Optimizer.lr`` section into a scheduler stepped once per optimizer step.

    ``steps_per_epoch`` must already be ``iters_per_epoch // update_freq``.
    """
    if not isinstance(lr_cfg, dict) or "name" not in lr_cfg:
        raise ConfigError(path, "must be a mapping with a 'name' (e.g. {name: Cosine, learning_rate: 0.1}); "
                                f"choices: {', '.join(LR_SCHEDULERS.names())}")
    kwargs = {k: v for k, v in lr_cfg.items() if k != "name"}
    for key in ("epochs", "steps_per_epoch"):
        if key in kwargs:
            raise ConfigError(f"{path}.{key}", "is set by the trainer (Global.epochs, iterations per "
                                               "epoch // Global.update_freq); remove it here")
    try:
        return LR_SCHEDULERS.build(lr_cfg["name"], kwargs, path, epochs=epochs,
                                   steps_per_epoch=steps_per_epoch)
    except ConfigError as err:
        if str(err.path).startswith(path):
            raise
        raise _reroot(err, path) from None


def lr_at(sched, step: Optional[int] = None) -> float:
    """The lr the next optimizer step uses (``step=None``), or the closed-form lr at ``step``.

    Works for any Paddle scheduler or float when ``step`` is None; a given ``step`` needs one of
    the schedules above.
    """
    if isinstance(sched, (int, float)):
        return float(sched)
    if step is None:
        return float(sched())
    if not hasattr(sched, "lr_at_step"):
        raise TypeError(f"{type(sched).__name__} has no closed form; call lr_at(sched) without step")
    return float(sched.lr_at_step(step))
