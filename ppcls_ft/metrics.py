"""Evaluation metrics of the PaddleClas YAML (``Metric.Train`` / ``Metric.Eval``).

Metrics accumulate exact counts over batches (correct samples / samples), never an average of
per-batch averages, so a short last batch weighs what it should. ``build_metrics`` returns one
object with ``update(logits, labels)``, ``accumulate()`` and ``reset()``; the keys (``top1``,
``top5``) are the log-line and VisualDL names, and ``top1`` picks the best model.
"""
import logging
from typing import Union

import numpy as np
import paddle

from .errors import ConfigError
from .registry import METRICS

_LOG = logging.getLogger("ppcls_ft")


def _numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _labels(labels, k):
    """Int class ids [N] from int [N]/[N, 1] labels, or the argmax of soft targets [N, K]."""
    y = _numpy(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] == k and np.issubdtype(y.dtype, np.floating):
        y = y.argmax(axis=1)  # Mixup/Cutmix targets: the dominant class counts as the label
    if y.ndim != 1:
        raise ValueError(f"labels must be [N], [N, 1] or soft [N, {k}], got shape {y.shape}")
    return y.astype(np.int64)


def true_class_rank(logits, labels):
    """0-based rank of the true class per sample, ties broken by lower class id first.

    Equals the position of the label in a stable descending sort, so equal logits give the
    same answer on every run and platform: ``rank = #{j: z_j > z_y} + #{j < y: z_j == z_y}``.
    """
    z = np.asarray(logits, dtype=np.float64)
    idx = np.arange(z.shape[1])
    z_true = z[np.arange(z.shape[0]), labels][:, None]
    return ((z > z_true).sum(axis=1) + ((z == z_true) & (idx[None, :] < labels[:, None])).sum(axis=1))


@METRICS.register
class TopkAcc:
    """Top-k accuracy for each k, as exact fractions of all samples seen since ``reset()``.

    YAML: ``- TopkAcc: {topk: [1, 5]}``. When k exceeds the number of classes K (top5 on a
    3-class set) the metric is still reported as ``top{k}`` so log lines and tags stay the same,
    but computed with ``min(k, K)`` (always 1.0); a note is logged once.
    """

    def __init__(self, topk: Union[list, int] = (1, 5)):
        ks = [topk] if isinstance(topk, int) and not isinstance(topk, bool) else list(topk)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ConfigError("topk", f"must be a positive int or a list of them, got {topk!r}")
        self.topk = sorted(set(ks))
        self._noted = False
        self.reset()

    def reset(self):
        self.correct = {k: 0 for k in self.topk}
        self.count = 0

    def update(self, logits, labels):
        """Add a batch; returns this batch's accuracies (for the per-iteration log line)."""
        z = _numpy(logits)
        z = z.reshape(z.shape[0], -1)
        n, num_classes = z.shape
        y = _labels(labels, num_classes)
        if y.shape[0] != n:
            raise ValueError(f"{n} logits rows but {y.shape[0]} labels")
        if ((y < 0) | (y >= num_classes)).any():
            raise ValueError(f"labels must be in [0, {num_classes}), got {sorted(set(y.tolist()))[:5]}")
        if not self._noted and self.topk[-1] > num_classes:
            self._noted = True
            _LOG.info("TopkAcc: top%d with %d classes is computed as top%d (always 1.0)",
                      self.topk[-1], num_classes, num_classes)
        rank = true_class_rank(z, y)
        batch = {}
        for k in self.topk:
            hit = int((rank < min(k, num_classes)).sum())
            self.correct[k] += hit
            batch[f"top{k}"] = hit / n if n else 0.0
        self.count += n
        return batch

    def accumulate(self):
        return {f"top{k}": (self.correct[k] / self.count if self.count else 0.0) for k in self.topk}

    def all_reduce(self):
        """Sum the counts over devices (each rank saw a shard of the data)."""
        counts = paddle.to_tensor([self.count] + [self.correct[k] for k in self.topk], dtype="int64")
        paddle.distributed.all_reduce(counts)
        values = counts.numpy().tolist()
        self.count, self.correct = values[0], dict(zip(self.topk, values[1:]))


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@METRICS.register
class TprAtFpr:
    """Binary PULC metric: the best true-positive rate at a false-positive rate <= ``max_fpr``.

    YAML: ``- TprAtFpr:`` or ``- TprAtFpr: {max_fpr: 0.001}``. The score of a sample is the
    softmax probability of class 1; label 1 is positive, any other label negative. As in
    PaddleClas, thresholds ``t = i / 10000`` (i = 0..9999) are tried, a sample counts as positive
    when its score is ``> t``, and the largest TPR whose FPR is within ``max_fpr`` is reported as
    ``tpr`` with its threshold as ``tpr_threshold``. With no negatives the FPR is taken as 0.
    ``top1`` still picks the best model (list TopkAcc too, as the PULC configs do).
    """

    STEPS = 10000  # PaddleClas's threshold grid

    def __init__(self, max_fpr: float = 1 / 1000.):
        if not 0.0 <= max_fpr <= 1.0:
            raise ConfigError("max_fpr", f"is a rate in [0, 1], got {max_fpr}")
        self.max_fpr = float(max_fpr)
        self.reset()

    def reset(self):
        self.pos_scores, self.neg_scores = [], []

    def update(self, logits, labels):
        """Keep this batch's class-1 scores; returns {} (one batch gives no useful rate)."""
        z = _numpy(logits)
        z = z.reshape(z.shape[0], -1)
        if z.shape[1] < 2:
            raise ValueError(f"TprAtFpr needs at least 2 classes (score = P(class 1)), got {z.shape[1]}")
        y = _labels(labels, z.shape[1])
        score = _softmax(z)[:, 1]
        self.pos_scores.extend(score[y == 1].tolist())
        self.neg_scores.extend(score[y != 1].tolist())
        return {}

    def accumulate(self):
        pos, neg = np.asarray(self.pos_scores), np.asarray(self.neg_scores)
        best, best_t = 0.0, None
        if pos.size:
            thresholds = np.arange(self.STEPS) / self.STEPS
            # counts of scores > t for every t at once: sorted scores + searchsorted (side=right)
            tpr = (pos.size - np.searchsorted(np.sort(pos), thresholds, side="right")) / pos.size
            if neg.size:
                fpr = (neg.size - np.searchsorted(np.sort(neg), thresholds, side="right")) / neg.size
            else:
                fpr = np.zeros_like(tpr)
            ok = np.flatnonzero(fpr <= self.max_fpr)
            if ok.size:
                i = ok[np.argmax(tpr[ok])]  # first (lowest) threshold reaching the best TPR
                best, best_t = float(tpr[i]), float(thresholds[i])
        return {"tpr": best, "tpr_threshold": best_t if best_t is not None else 0.0}

    def all_reduce(self):
        """Gather every rank's scores (a rate is not a sum of per-rank rates)."""
        gathered = []
        paddle.distributed.all_gather_object(gathered, (self.pos_scores, self.neg_scores))
        self.pos_scores = [s for pos, _ in gathered for s in pos]
        self.neg_scores = [s for _, neg in gathered for s in neg]


class MetricSet:
    """All metrics of one ``Metric.Train``/``Metric.Eval`` list behind one interface."""

    def __init__(self, metrics):
        self.metrics = list(metrics)

    def update(self, logits, labels):
        out = {}
        for m in self.metrics:
            out.update(m.update(logits, labels))
        return out

    def accumulate(self):
        out = {}
        for m in self.metrics:
            out.update(m.accumulate())
        return out

    def reset(self):
        for m in self.metrics:
            m.reset()

    def all_reduce(self):
        """Sum the counts over devices (multi-GPU eval: each rank saw a shard of the data)."""
        if paddle.distributed.get_world_size() < 2:
            return
        for m in self.metrics:
            m.all_reduce()

    def __len__(self):
        return len(self.metrics)


def build_metrics(metric_list, path: str = "Metric.Eval") -> MetricSet:
    """Build ``[{TopkAcc: {topk: [1, 5]}}, ...]``; ``None`` (e.g. ``Metric.Train: null``) -> empty set."""
    if metric_list is None:
        return MetricSet([])
    if not isinstance(metric_list, list):
        raise ConfigError(path, "must be a list like [{TopkAcc: {topk: [1, 5]}}]")
    metrics = []
    for i, entry in enumerate(metric_list):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{path}.{i}", f"each entry is one mapping like {{TopkAcc: {{topk: [1, 5]}}}}, "
                                             f"got {entry!r}")
        name, kwargs = next(iter(entry.items()))
        here = f"{path}.{i}.{name}"
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ConfigError(here, f"expected a mapping of options, got {kwargs!r}")
        try:
            metrics.append(METRICS.build(name, dict(kwargs or {}), here))
        except ConfigError as err:
            if str(err.path).startswith(path):
                raise
            raise ConfigError(f"{here}.{err.path}", str(err)[len(err.path) + 2:]) from None
    return MetricSet(metrics)
