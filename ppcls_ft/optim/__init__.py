"""Optimisation side: lr schedules, optimizers (param groups, no-decay, lr multipliers), EMA."""
from .ema import ModelEMA
from .lr_scheduler import LR_TAG, build_lr_scheduler, lr_at
from .optimizer import build_optimizer

__all__ = ["LR_TAG", "ModelEMA", "build_lr_scheduler", "build_optimizer", "lr_at"]
