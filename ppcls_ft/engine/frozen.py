"""Frozen means cheap: what does not train costs no backward, and, where nothing random touches
it, no second forward either.

While the fine-tuning strategy holds the backbone frozen (``FineTune.linear_probe``, or the first
``FineTune.freeze_backbone_epochs``), the backbone is a fixed function of the image, so:

- its forward runs under ``paddle.no_grad`` (the strategy holds every backbone layer in eval
  mode while frozen, its dropout and drop-path too, on any number of processes:
  ``strategies.train_mode``), and only the classifier head runs with gradients;
- when the train transforms are all deterministic (no random crop, flip, colour or erasing op)
  and no batch operator (Mixup, Cutmix) mixes the images, the features of every train image are
  computed once, kept in memory (``FineTune.feature_cache_mb``, default 2048 MB; larger sets run
  the forward-only path every epoch) and each frozen epoch after that trains the head on them
  directly, in the order and batches the train sampler gives for that epoch: no decoding, no
  backbone.

One process only: with several, the step must go through ``paddle.DataParallel``'s own forward
(its reducer prepares the gradient all-reduce there), and each rank's shard changes every epoch,
so every rank would need every image's features. Several processes train the frozen epochs the
normal way.

The trainer asks ``plan(epoch)`` what the epoch runs: ``None`` (the normal step), or a head
``forward`` and, with the cache, the batches to feed it.
"""
import math

import numpy as np
import paddle

from ..utils import distributed as dist

DEFAULT_CACHE_MB = 2048


def cache_blocker(cfg, batch_op):
    """Why the features of the train set cannot be cached, or None when they can."""
    from ..data.transforms import is_deterministic

    train = ((cfg.get("DataLoader") or {}).get("Train") or {}).get("dataset") or {}
    ops = [op if isinstance(op, dict) else {op: None} for op in train.get("transform_ops") or []]
    random_ops = [next(iter(op)) for op in ops if not is_deterministic(op)]
    if random_ops:
        return f"the train transforms include {', '.join(random_ops)}"
    if batch_op is not None:
        return "a batch operator (Mixup/Cutmix) mixes the images"
    return None


class FrozenBackbone:
    """The frozen-backbone fast path of one run (see the module docstring)."""

    def __init__(self, parts, inner, logger):
        self.p, self.inner, self.log = parts, inner, logger
        strategy = parts.strategy
        self.active = bool(strategy.linear_probe or strategy.freeze_backbone_epochs) and dist.world_size() == 1
        self.budget_mb = strategy.feature_cache_mb
        self.blocker = cache_blocker(parts.cfg, parts.batch_op) if self.active else None
        self.features = self.labels = None
        self._said = False

    # ------------------------------------------------------------------ the plan
    def plan(self, epoch):
        """``None`` when the backbone trains this epoch; else ``(forward, batches)``: ``forward``
        maps what the batches hold to logits, ``batches`` is None for the train loader's images."""
        if not (self.active and self.p.strategy.frozen):
            self.features = self.labels = None  # the backbone trains from here on: free the cache
            return None
        if self.blocker is None and self.features is None:
            self._build_cache(epoch)
        if self.features is not None:
            self._say(f"epoch {epoch}: the frozen backbone's features of {len(self.features)} "
                      "train images are cached; the head trains on them")
            return self.inner.forward_head, self._cached_batches()
        self._say(f"epoch {epoch}: frozen backbone runs forward-only (no cache: {self.blocker})")
        return self._forward_only, None

    def _say(self, msg):
        if not self._said:
            self.log.info(msg)
            self._said = True

    def _forward_only(self, images):
        with paddle.no_grad():
            feats = self.inner.forward_features(images).detach()
        return self.inner.forward_head(feats)

    def _features(self, images):
        """Backbone features as the step computes them (under the AMP policy's autocast), in
        float32 for the cache (the backbone is in eval mode: ``strategies.train_mode``)."""
        with paddle.no_grad(), self.p.amp.autocast():
            return self.inner.forward_features(images).detach().astype("float32")

    # ------------------------------------------------------------------ the cache
    def _build_cache(self, epoch):
        loader = self.p.train_loader
        dataset = loader.dataset
        n = len(dataset)
        probe = self._probe_dim(dataset)
        if probe is None:
            self.blocker = "no readable train image"
            return
        need_mb = n * probe * 4 / 2 ** 20
        if need_mb > self.budget_mb:
            self.blocker = (f"{n} x {probe} features need {need_mb:.0f} MB, more than "
                            f"FineTune.feature_cache_mb {self.budget_mb:g}")
            return
        features = np.zeros((n, probe), np.float32)
        labels = np.full((n,), -1, np.int64)  # -1: unreadable, never fed to the head
        batch = int(getattr(loader.batch_sampler, "batch_size", 32) or 32)
        self.log.info(f"epoch {epoch}: computing the frozen backbone's features of {n} train images "
                      f"once ({need_mb:.1f} MB)")
        # the train loader's worker_init_fn: its workers leave stop signals to this process
        # (a scheduler's SIGTERM to the process group must not kill them mid-read)
        reader = paddle.io.DataLoader(_Indexed(dataset), batch_size=batch, shuffle=False,
                                      num_workers=loader.num_workers, collate_fn=_collate_indexed,
                                      worker_init_fn=loader.worker_init_fn, return_list=True)
        from ..data.loader import iterate
        for images, labels_b, index in iterate(reader):
            if len(index) == 0:
                continue
            images = images if isinstance(images, paddle.Tensor) else paddle.to_tensor(images)
            feats = self._features(images)
            index = np.asarray(index)
            features[index] = feats.numpy().reshape(len(index), -1)
            labels[index] = np.asarray(labels_b)
        self.features, self.labels = features, labels

    def _probe_dim(self, dataset):
        for i in range(len(dataset)):
            item = dataset[i]
            if item is not None:
                return int(math.prod(self._features(paddle.to_tensor(item[0][None])).shape[1:]))
        return None

    def _cached_batches(self):
        """The epoch's batches as the train sampler orders them (``set_epoch`` has been called),
        as ``(features, labels, n_skipped)`` like the loader's; an unreadable image is skipped."""
        for keys in self.p.train_loader.batch_sampler:
            index = np.asarray([k[0] if isinstance(k, tuple) else k for k in keys], np.int64)
            keep = index[self.labels[index] >= 0]
            yield (paddle.to_tensor(self.features[keep]), paddle.to_tensor(self.labels[keep]),
                   np.asarray([len(index) - len(keep)], np.int64))


class _Indexed(paddle.io.Dataset):
    """``dataset[i]`` with its index, so a skipped (unreadable) image keeps the others aligned."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (item[0], item[1], np.int64(i))


def _collate_indexed(batch):
    items = [b for b in batch if b is not None]
    if not items:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    return (np.stack([it[0] for it in items]).astype(np.float32, copy=False),
            np.asarray([it[1] for it in items], np.int64), np.asarray([it[2] for it in items], np.int64))
