"""One seed tree for every random draw of a run: ``Global.seed -> rank -> epoch -> stream``.

Each leaf is a numpy ``SeedSequence`` spawned from the root by its path, so seeds are well mixed
(nearby paths give unrelated streams), a resumed run re-derives exactly the seeds of the
uninterrupted one, and every rank of a multi-device run draws its own crops, flips, Mixup/Cutmix
lambdas and dropout masks (PaddleClas seeds ``seed + rank`` only for Python/numpy, so its
loader workers repeat draws across ranks).

Streams below ``(rank, epoch)``:

- ``GLOBAL``: Python ``random``, numpy's global RNG and ``paddle.seed`` (dropout, drop-path);
- ``BATCH_OP``: the Mixup/Cutmix operator;
- ``WORKER, k``: loader worker ``k`` (``k = 0`` is the main process when there are no workers);
- ``ITEM, position``: the augmentation of the item at that position of this rank's epoch, so the
  draws do not depend on which worker process loads it.
"""
import random

import numpy as np

GLOBAL, BATCH_OP, WORKER, ITEM = range(4)


def derive(root, *path):
    """A 32-bit seed for ``path`` (integers) below ``root``."""
    seq = np.random.SeedSequence(int(root) % 2**63, spawn_key=tuple(int(p) for p in path))
    return int(seq.generate_state(1)[0])


def seed_globals(seed):
    """Seed Python ``random`` and numpy's global RNG (what PaddleClas transforms draw from)."""
    random.seed(seed)
    np.random.seed(seed)


class SeedTree:
    """The root seed with helpers for the branches the training loop uses."""

    def __init__(self, root):
        self.root = int(root or 0)

    def __call__(self, *path):
        return derive(self.root, *path)

    def epoch_seed(self, rank, epoch, stream=GLOBAL):
        return self(rank, epoch, stream)

    def seed_process(self, rank, epoch):
        """Seed Python, numpy and Paddle for (rank, epoch): dropout masks and drop-path."""
        import paddle
        seed = self.epoch_seed(rank, epoch)
        seed_globals(seed)
        paddle.seed(seed)
        return seed
