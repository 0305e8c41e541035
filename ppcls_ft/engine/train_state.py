"""The loop's own state in one object: what a checkpoint must hold for an exact resume.

``TrainState`` keeps the epoch, the optimizer-step count, the best metric, the per-epoch history,
the root of the seed tree and the fine-tuning strategy's state. Everything random derives from
``(seed, rank, epoch, ...)`` (``utils.seeding``), so the state needs no RNG snapshots: resuming at
epoch N re-derives the seeds the uninterrupted run used from epoch N + 1 on.

``load_state_dict`` is strict: a missing or extra key is an error that names it, so a
``.pdstates`` from another program or a damaged file is never half-restored in silence.
"""
from dataclasses import asdict, dataclass, field

from ..errors import WeightsError

# Arch keys that make a checkpoint's weights and optimizer state meaningless for another config.
_IDENTITY_KEYS = ("name", "class_num")


@dataclass
class TrainState:
    epoch: int = 0               # last completed epoch (1-based; 0 = nothing trained yet)
    global_step: int = 0         # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = None
    history: list = field(default_factory=list)
    seed: int = 0                # root of the seed tree
    strategy: dict = field(default_factory=dict)

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, state, where="checkpoint"):
        if not isinstance(state, dict):
            raise WeightsError(f"{where}: train_state is {type(state).__name__}, expected a mapping")
        own = set(self.state_dict())
        missing, extra = sorted(own - set(state)), sorted(set(state) - own)
        if missing or extra:
            raise WeightsError(f"{where}: train_state keys differ from this version's: missing "
                               f"{missing}, unexpected {extra}; was it written by another program?")
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.best_top1 = float(state["best_top1"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.history = list(state["history"] or [])
        self.seed = int(state["seed"])
        self.strategy = dict(state["strategy"] or {})

    @property
    def best_known(self):
        return self.best_epoch is not None


def check_compatible(saved_cfg, cfg, where):
    """Refuse to resume weights of another model or class count (a clear line, not a shape dump)."""
    if not saved_cfg:
        return
    old, new = saved_cfg.get("Arch") or {}, cfg.get("Arch") or {}
    prefix = where.partition("=")[2] or where  # "Global.checkpoints=out/latest" -> out/latest
    for key in _IDENTITY_KEYS:
        if key in old and old.get(key) != new.get(key):
            raise WeightsError(
                f"{where} was trained with Arch.{key}={old.get(key)!r} but this config has "
                f"Arch.{key}={new.get(key)!r}; resume with the same Arch, or start a new run with "
                f"Global.pretrained_model={prefix} and another Global.output_dir")
