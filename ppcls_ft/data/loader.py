"""``build_dataloader``: one ``DataLoader.Train|Eval`` section -> ``paddle.io.DataLoader``.

Section layout (PaddleClas): ``{dataset: {name, ...}, sampler: {name, batch_size, ...},
loader: {num_workers, use_shared_memory}}``. ``dataset.batch_transform_ops`` is ignored here:
batch operators run in the train step, build them with ``batch_ops.build_batch_op``.

Reproducible augmentation (seeds from ``utils.seeding``: seed -> rank -> epoch -> stream): the
batch sampler is wrapped so that each index travels with its position in this rank's epoch, and
the dataset wrapper reseeds python ``random`` and numpy's global RNG from (seed, rank, epoch,
position) before each item. The result is the same whichever worker process handles the item,
so ``num_workers=0`` and ``num_workers=2`` give identical batches, and every rank draws its own.
``worker_init_fn`` additionally seeds each worker from (seed, rank, epoch, worker) when it starts
(workers persist across epochs, so that is the epoch of its start) and, with no workers,
``set_epoch`` seeds the main process; nothing draws from those seeds today.

Evaluation loaders (mode eval/test/infer) shard the dataset across ranks without padding, so a
multi-device eval counts every image exactly once (``samplers.EvalShardSampler``).
"""
import atexit
import inspect
import multiprocessing.util  # noqa: F401  (imported before the atexit handler below: see there)
import random
import signal

import numpy as np
import paddle

from ..errors import ConfigError
from ..registry import DATASETS, SAMPLERS
from ..utils.seeding import ITEM, WORKER, derive, seed_globals
from .dataset import collate_skip_none
from .samplers import EvalShardSampler, world

_MODES = ("train", "eval", "test", "infer")
_SECTION_KEYS = ("dataset", "sampler", "loader")
_LOADER_KEYS = {"num_workers": int, "use_shared_memory": bool}


class _SeededBatches:
    """Wraps a batch sampler; yields ``[(index, item_seed), ...]`` and forwards ``set_epoch``."""

    def __init__(self, batch_sampler, seed, rank=0):
        self.batch_sampler = batch_sampler
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0
        self.limit = None  # at most this many batches per epoch (limit_batches)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        pos = 0
        for n, batch in enumerate(self.batch_sampler):
            if self.limit is not None and n >= self.limit:
                return
            keys = []
            for idx in batch:
                keys.append((int(idx), derive(self.seed, self.rank, self.epoch, ITEM, pos)))
                pos += 1
            yield keys

    def __len__(self):
        n = len(self.batch_sampler)
        return n if self.limit is None else min(n, self.limit)

    def __getattr__(self, name):  # batch_size, drop_last, ... of the wrapped sampler
        if name == "batch_sampler":
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


class _SeededDataset(paddle.io.Dataset):
    """``ds[(index, item_seed)]`` reseeds the global RNGs, then returns ``dataset[index]``.

    The caller's RNG state is restored afterwards, so loading in the main process does not
    disturb other users of ``random`` / ``np.random``. Attributes of the wrapped dataset
    (``labels``, ``class_names``, ``class_counts``) are forwarded.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        idx, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            seed_globals(seed)
            return self.dataset[idx]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _WorkerInit:
    """``worker_init_fn``: seeds each worker from (seed, rank, epoch, worker_id + 1)."""

    def __init__(self, seed, rank=0):
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0

    def __call__(self, worker_id):
        # Stop signals are the main process's to handle (engine/run_guard.py). A scheduler signals
        # the whole process group, and a worker killed by SIGTERM makes Paddle's SIGCHLD handler
        # raise in the main process, anywhere in a step. Workers still end: the loader shuts them
        # down, and Paddle's parent watchdog ends them if the main process dies.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        seed_globals(derive(self.seed, self.rank, self.epoch, WORKER, worker_id + 1))


def _accepted_extras(fn, **candidates):
    """The subset of ``candidates`` that ``fn``'s signature takes (and is not None)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in candidates.items() if k in params and v is not None}


def _build_dataset(cfg, class_num, path):
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ConfigError(path, "needs a mapping with 'name' (e.g. ImageNetDataset) and its keys")
    cfg = dict(cfg)
    name = cfg.pop("name")
    cfg.pop("batch_transform_ops", None)  # applied in the train step (batch_ops.build_batch_op)
    extras = _accepted_extras(DATASETS.get(name, f"{path}.name"), class_num=class_num)
    try:
        return DATASETS.build(name, cfg, path, **extras)
    except ConfigError as e:
        if e.path.startswith(path):
            raise
        raw = str(e)[len(e.path) + 2:] if e.path else str(e)
        raise ConfigError(f"{path}.{e.path}", raw) from e  # transform_ops.1.X -> full path


def _build_sampler(cfg, dataset, mode, seed, path):
    cfg = dict(cfg or {})
    name = cfg.pop("name", "DistributedBatchSampler")
    if "batch_size" not in cfg:
        raise ConfigError(path, "missing required key 'batch_size' (per-device batch size)")
    if name == "DistributedBatchSampler" and "shuffle" not in cfg:
        cfg["shuffle"] = mode == "train"
    fn = SAMPLERS.get(name, f"{path}.name")
    extras = {"dataset": dataset}
    if "seed" not in cfg:
        extras.update(_accepted_extras(fn, seed=seed))
    try:
        sampler = SAMPLERS.build(name, cfg, path, **extras)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(path, str(e)) from e
    if mode != "train":
        # Paddle's DistributedBatchSampler pads every rank to the same length with repeated
        # images, which a multi-device eval would count twice; evaluation shards exactly.
        return EvalShardSampler(len(dataset), sampler.batch_size)
    return sampler


def _loader_options(cfg, path):
    cfg = dict(cfg or {})
    for key, value in cfg.items():
        if key not in _LOADER_KEYS:
            raise ConfigError(f"{path}.{key}", f"unknown key; valid keys: {', '.join(_LOADER_KEYS)}")
        if not isinstance(value, _LOADER_KEYS[key]) or isinstance(value, bool) != (
                _LOADER_KEYS[key] is bool):
            raise ConfigError(f"{path}.{key}", f"expected {_LOADER_KEYS[key].__name__}, got {value!r}")
    workers = cfg.get("num_workers", 0)
    if workers < 0:
        raise ConfigError(f"{path}.num_workers", f"must be >= 0, got {workers}")
    return workers, cfg.get("use_shared_memory", True)


def build_dataloader(section: dict, mode: str, *, seed: int = 0, class_num=None,
                     path: str = "DataLoader.Train") -> paddle.io.DataLoader:
    """Build the loader for one ``DataLoader.<Mode>`` section.

    ``mode``: train | eval | test | infer (only sets the default ``shuffle`` when the sampler
    omits it). ``class_num`` (``Arch.class_num``) lets the dataset reject out-of-range labels.
    Batches are ``(images [N,C,H,W] float32, labels [N] int64, n_skipped [1] int64)``. Call
    ``set_epoch(loader, epoch)`` before each epoch.
    """
    mode = mode.lower()  # accepts the section names "Train"/"Eval" as well
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(section, dict):
        raise ConfigError(path, f"expected a mapping with keys {', '.join(_SECTION_KEYS)}")
    for key in section:
        if key not in _SECTION_KEYS:
            raise ConfigError(f"{path}.{key}", f"unknown key; valid keys: {', '.join(_SECTION_KEYS)}")
    if "dataset" not in section:
        raise ConfigError(path, "missing required key 'dataset'")
    dataset = _build_dataset(section["dataset"], class_num, f"{path}.dataset")
    sampler = _build_sampler(section.get("sampler"), dataset, mode, seed, f"{path}.sampler")
    workers, shared_mem = _loader_options(section.get("loader"), f"{path}.loader")
    rank = world()[1]
    # Persistent workers: Paddle forks a loader's workers at each iter(), and every page the
    # training process then writes for the first time is copied (copy-on-write while the child
    # lives). After an epoch the heap holds gigabytes of activations: the first step after each
    # fork took 3 s instead of 0.5 (MobileNetV2, 160 px), twice an epoch with evaluation. Kept,
    # the workers are forked once per loader (start_workers forks them while the heap is small).
    # Augmentations stay exact: every item carries its own seed (_SeededBatches), whatever worker
    # or epoch loads it. The price: Paddle's restart of a kept iterator polls every 0.5 s, so
    # each loop over a loader begins about 0.5 s late.
    loader = _Loader(
        _SeededDataset(dataset), batch_sampler=_SeededBatches(sampler, seed, rank),
        collate_fn=collate_skip_none, num_workers=workers, use_shared_memory=shared_mem,
        worker_init_fn=_WorkerInit(seed, rank), return_list=True, persistent_workers=workers > 0)
    set_epoch(loader, 0)
    return loader


class _Loader(paddle.io.DataLoader):
    """``paddle.io.DataLoader`` that registers itself for the exit handler (``_close_all``)
    whenever a loop starts its persistent workers."""

    def __iter__(self):
        if self._persistent_workers:
            _PERSISTENT.add(self)
        return super().__iter__()


def limit_batches(loader, batches: int):
    """At most ``batches`` batches per epoch from ``loader`` (the trainer drops a partial
    accumulation group at the end): the loop ends at the end of the data, so a persistent loader
    keeps its workers instead of being left early every epoch."""
    loader.batch_sampler.limit = int(batches)


def start_workers(loader):
    """Fork a persistent loader's workers now (a no-op without workers). Called before the model
    and its optimizer exist: a worker forked later shares the whole training heap with the
    trainer, and each page the trainer then writes is copied, costing the trainer time and the
    worker that much private memory."""
    if not getattr(loader, "_persistent_workers", False):
        return
    # No batch is requested: Paddle's restart of a kept iterator (the first loop's iter()) races
    # with batches still in flight (its bookkeeping is reset while they arrive), so the workers
    # are started with an empty epoch.
    sampler = loader.batch_sampler
    saved, sampler.limit = sampler.limit, 0
    try:
        iter(loader)
    finally:
        sampler.limit = saved


def set_epoch(loader, epoch: int):
    """Set the sampler's epoch and the augmentation seed base (call before iterating)."""
    loader.batch_sampler.set_epoch(epoch)
    init = loader.worker_init_fn
    if isinstance(init, _WorkerInit):
        init.epoch = int(epoch)
        if loader.num_workers == 0:  # no workers: seed this process for the epoch
            seed_globals(derive(init.seed, init.rank, init.epoch, WORKER, 0))


def iterate(loader):
    """The batches of ``loader``, whose worker processes are shut down if the loop ends early.

    A Paddle loader iterator left before its end (a ``break``, an exception, a stop signal) is
    never freed: its prefetch thread refers to it, so its workers live until interpreter exit,
    where multiprocessing then waits for them. Closing this generator (which the loop does on
    leaving it) runs the shutdown Paddle's own ``__del__`` would have run. A loop that ends at
    the end of the data leaves a persistent loader's workers running for the next one; ``close``
    ends them.
    """
    batches, finished = None, False
    try:
        batches = iter(loader)  # restarting kept workers can fail too (a signal, a dead worker)
        yield from batches
        finished = True
    finally:
        if not (finished and getattr(loader, "_persistent_workers", False)):
            _shutdown(loader, batches)


# Every loader with persistent workers, closed at interpreter exit if nobody closed it. Otherwise
# multiprocessing's exit handler ends the workers with SIGTERM, which they ignore (_WorkerInit),
# and then waits for them forever (tests/test_dataset.py makes exactly that exit). atexit runs
# the last-registered handler first, and importing multiprocessing.util above registers its
# handler before this one. Strong references: a persistent iterator outlives its loader (its
# prefetch thread refers to it), so a loader that went out of scope must still be reachable
# here. A loader joins at each loop (_Loader.__iter__) and leaves at close().
_PERSISTENT = set()


@atexit.register
def _close_all():
    for loader in list(_PERSISTENT):
        close(loader)


def close(loader):
    """End a persistent loader's worker processes (a no-op when it has none running). The
    loader stays usable: its next loop starts new workers."""
    _PERSISTENT.discard(loader)
    _shutdown(loader)


def _shutdown(loader, batches=None):
    """Shut down ``batches`` (by default the iterator a persistent loader keeps)."""
    if batches is None:
        batches = getattr(loader, "_iterator", None)
    shutdown = getattr(batches, "_try_shutdown_all", None)  # absent without workers (or None)
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is batches:
        # Paddle's persistent loader reuses the iterator it keeps here; a shut-down one cannot
        # be reused, so the next iter() must make a new one
        loader._iterator = None
