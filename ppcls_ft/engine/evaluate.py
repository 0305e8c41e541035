"""Evaluation over the eval loader, exact on any number of devices.

Each rank evaluates its shard (``samplers.EvalShardSampler``: every image once, no padding); the
sums and counts are then all-reduced with a fixed layout, so a rank whose shard is empty still
takes part and the result equals a one-process evaluation of the same weights.
"""
import numpy as np
import paddle

from ..data.loader import iterate
from ..utils import distributed as dist
from .amp import AmpPolicy
from .run_guard import check_stop


class Average:
    """Sample-weighted running mean."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value, n=1):
        self.total += float(value) * n
        self.count += n

    @property
    def mean(self):
        return self.total / self.count if self.count else None


def loss_keys(loss, class_num):
    """The names ``loss`` returns, known before any batch: every rank must contribute vectors of
    one layout to an all-reduce, even a rank whose shard or batch is empty."""
    with paddle.no_grad():
        return list(loss(paddle.zeros([1, class_num], "float32"), paddle.zeros([1], "int64")))


def _batch_indices(loader):
    """The dataset indices of each eval batch, in loader order (``EvalShardSampler`` is
    deterministic, so walking it beside the loader pairs every batch with its indices)."""
    from ..data.samplers import EvalShardSampler
    sampler = getattr(loader.batch_sampler, "batch_sampler", loader.batch_sampler)
    if isinstance(sampler, EvalShardSampler):
        yield from iter(sampler)
    while True:
        yield None


def evaluate(parts, model, stats=None):
    """Loss terms, top-k and the image count over the eval loader, e.g.
    ``{'loss', 'CELoss', 'top1', 'top5', 'images'}``; ``stats`` (an ``analysis.ClassStats``)
    also collects the confusion matrix and the most confident mistakes.

    O2 (and O1 with ``AMP.use_fp16_test``) runs under autocast, as training does. Leaves the
    model in eval mode: the next epoch's ``strategy.train_mode`` decides what trains.
    """
    model.eval()
    amp = parts.amp or AmpPolicy()
    metrics = parts.eval_metrics
    if metrics is not None:
        metrics.reset()
    keys = loss_keys(parts.eval_loss, model.class_num) if parts.eval_loss is not None else []
    sums, count, skipped = [0.0] * len(keys), 0, 0
    indices = _batch_indices(parts.eval_loader)
    single = dist.world_size() == 1
    with paddle.no_grad():
        for images, labels, n_skipped in iterate(parts.eval_loader):
            if single:  # ranks would have to agree to stop; on one device, stop at once
                check_stop("evaluation")
            batch_indices = next(indices)
            skipped += int(np.asarray(n_skipped).sum())
            n = int(images.shape[0])
            if n == 0:
                continue
            with amp.autocast(training=False):
                logits = model(images)
            logits = logits.astype("float32")
            count += n
            if keys:
                values = parts.eval_loss(logits, labels)
                for i, k in enumerate(keys):
                    sums[i] += float(values[k]) * n
            if metrics is not None:
                metrics.update(logits, labels)
            if stats is not None:  # rows map to indices only when no image was dropped
                stats.update(paddle.nn.functional.softmax(logits).numpy(), labels.numpy(),
                             batch_indices if n == len(batch_indices or ()) else None)
    total = dist.all_sum([count, skipped] + sums)
    if stats is not None:
        stats.reduce()
    count, skipped = int(total[0]), int(total[1])
    if metrics is not None:
        metrics.all_reduce()
    if skipped:
        parts.logger.warning(f"[Eval] {skipped} unreadable images were skipped (see warnings above); "
                             "metrics cover the readable ones only")
    out = {k: (total[2 + i] / count if count else None) for i, k in enumerate(keys)}
    if metrics is not None:
        out.update(metrics.accumulate())
    out["images"] = count
    return out
