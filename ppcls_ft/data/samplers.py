"""Batch samplers: paddle's ``DistributedBatchSampler`` (PaddleClas default) and ``ClassBalancedSampler``.

Both are batch samplers (yield lists of dataset indices), split the data across ranks, and have
``set_epoch(epoch)`` so the order of every epoch is a pure function of (seed, epoch) -- a
resumed run sees the same batches as an uninterrupted one.
"""
import math
from typing import Optional

import numpy as np
import paddle

from ..registry import SAMPLERS


@SAMPLERS.register(name="DistributedBatchSampler")
def DistributedBatchSampler(dataset, batch_size: int, shuffle: bool = False,
                            drop_last: bool = False):
    """Paddle's ``paddle.io.DistributedBatchSampler`` (shuffles with ``RandomState(epoch)``).

    YAML: ``sampler: {name: DistributedBatchSampler, batch_size: 64, shuffle: True,
    drop_last: False}``. ``batch_size`` is per device, as in PaddleClas.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return paddle.io.DistributedBatchSampler(dataset, batch_size=batch_size, shuffle=shuffle,
                                             drop_last=drop_last)


def world():
    """(world size, rank) of this process; (1, 0) outside a launched multi-process run."""
    try:
        return paddle.distributed.get_world_size(), paddle.distributed.get_rank()
    except Exception:  # not initialised: single process
        return 1, 0


@SAMPLERS.register
class ClassBalancedSampler:
    """Draw samples with probability proportional to 1 / (count of their class).

    Our extension for imbalanced data: every class is drawn equally often in expectation. An
    epoch has ``len(dataset)`` draws (with replacement), split across ranks by striding.

    YAML: ``sampler: {name: ClassBalancedSampler, batch_size: 64, drop_last: False, seed: 0}``.
    The dataset must expose ``labels`` (int array), as ``ImageNetDataset`` does.
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool = False, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise ValueError(f"ClassBalancedSampler needs a dataset with a 'labels' array; "
                             f"{type(dataset).__name__} has none")
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        self.probs = weights / weights.sum()
        world_n, my_rank = world()
        self.nranks = int(num_replicas) if num_replicas is not None else world_n
        self.local_rank = int(rank) if rank is not None else my_rank
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(labels) / self.nranks)  # draws per rank per epoch

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def _indices(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples * self.nranks
        drawn = rng.choice(len(self.probs), size=total, replace=True, p=self.probs)
        return drawn[self.local_rank::self.nranks]

    def __iter__(self):
        idx = self._indices().tolist()
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start:start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __len__(self):
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class EvalShardSampler:
    """Evaluation batches: every index exactly once across ranks, no padding, no shuffling.

    Rank ``r`` of ``W`` takes indices ``r, r + W, r + 2W, ...``; ranks may get a different number
    of batches, which is fine for evaluation (nothing is synchronised per batch) and is what makes
    a multi-device eval equal a one-process eval. Used for every non-train loader.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None):
        world_n, my_rank = world()
        self.nranks = int(num_replicas) if num_replicas is not None else world_n
        self.local_rank = int(rank) if rank is not None else my_rank
        self.indices = list(range(self.local_rank, int(num_samples), self.nranks))
        self.batch_size = int(batch_size)
        self.drop_last = False

    def set_epoch(self, epoch: int):
        pass  # the order is fixed

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start:start + self.batch_size]

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)
