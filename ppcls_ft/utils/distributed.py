"""Multi-device helpers over ``paddle.distributed`` (one process per device, data parallel).

The same code runs on GPUs (NCCL) and on CPU processes (gloo), which is how the suite tests it:
``python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py ...``. Every helper is a
no-op in a single process, so the training loop has one path.
"""
import os

import paddle
import paddle.distributed as dist

_initialised = False


def world_size():
    return dist.get_world_size()


def rank():
    return dist.get_rank()


def init(device="cpu"):
    """``init_parallel_env`` once, when launched with more than one process. CPU runs use gloo
    even on a GPU build of Paddle, which otherwise picks NCCL whenever CUDA is compiled in."""
    global _initialised
    if world_size() > 1 and not _initialised:
        if not str(device).lower().startswith("gpu"):
            os.environ.setdefault("PADDLE_DISTRI_BACKEND", "gloo")
        dist.init_parallel_env()
        _initialised = True


def wrap(model):
    """``paddle.DataParallel(model)`` in a multi-process run, the model itself otherwise.

    The reducer registers the parameters that are trainable *now*: after a freeze/unfreeze the
    caller wraps again (``Trainer._wrap``), or the newly trainable ones would never be reduced.
    """
    return paddle.DataParallel(model) if world_size() > 1 else model


def all_sum(values):
    """Element-wise sum of a list of floats over ranks (float64, so counts stay exact)."""
    if world_size() < 2:
        return [float(v) for v in values]
    t = paddle.to_tensor([float(v) for v in values], dtype="float64")
    dist.all_reduce(t)
    return t.numpy().tolist()


def bit(rank):
    """Rank r's flag in a float64 ``all_sum``: 2**r names each rank exactly up to 50 ranks;
    beyond, every rank adds 1 and ``ranks_in_mask`` counts them instead."""
    return 2.0 ** rank if world_size() <= 50 else 1.0


def ranks_in_mask(mask):
    """Ranks set in a mask summed over ranks by ``all_sum`` (rank r contributes ``bit(r)``)."""
    if world_size() > 50:
        return [f"{int(mask)} of {world_size()}"] if mask else []
    mask = int(round(mask))
    return [r for r in range(mask.bit_length()) if mask >> r & 1]


def average_(tensors):
    """Average float tensors across ranks in place (batch-norm running statistics)."""
    if world_size() < 2:
        return
    n = world_size()
    for t in tensors:
        buf = t.astype("float32")
        dist.all_reduce(buf)
        paddle.assign((buf / n).astype(t.dtype), t)


def sync_grads_(params):
    """All-reduce-average gradients by hand: only for the rare accumulation boundary whose own
    batch was skipped on every rank, so the reducer (which syncs inside backward) never ran."""
    if world_size() < 2:
        return
    n = world_size()
    for p in params:
        g = p.grad
        if g is None:
            continue
        dist.all_reduce(g)
        paddle.assign(g / n, g)


def barrier():
    if world_size() > 1:
        dist.barrier()
