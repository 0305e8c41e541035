"""Run inside ``paddle.distributed.launch --nproc_per_node 2``: multi-device scenarios that need
a hand on one rank. Each rank writes ``OUT/<scenario>.rank<r>.json``; tests/test_distributed.py
reads them. Usage: harness.py OUT_DIR DATA_ROOT TRAIN_LIST VAL_LIST BAD_TRAIN_LIST SAME_LIST
(SAME_LIST: one image on every line, so both ranks load the same picture at each position)."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as pdist

from ppcls_ft.config import load_config
from ppcls_ft.data.loader import iterate
from ppcls_ft.engine.builder import build_train_parts
from ppcls_ft.engine.trainer import Trainer
from ppcls_ft.selfcheck import config

OUT, ROOT, TRAIN, VAL, BAD, SAME = map(Path, sys.argv[1:7])


def parts_for(name, **extra):
    cfg = load_config(config(OUT / name, ROOT, extra.pop("train_list", TRAIN), VAL, batch=2, **extra))
    return build_train_parts(cfg)


def gathered(value):
    """The float64 vector ``value`` from every rank, as a list of lists."""
    out = []
    pdist.all_gather(out, paddle.to_tensor(np.asarray(value, np.float64)))
    return [t.numpy().tolist() for t in out]


def checksum(model):
    return [float(v.astype("float64").sum()) for v in model.state_dict().values()]


def first_batch(loader):
    """The first batch, with the loader's prefetch thread stopped afterwards: an abandoned
    iterator keeps loading items, and their per-item reseeding of the global RNGs would race
    with the next iterator's."""
    batches = iterate(loader)
    try:
        return next(batches)
    finally:
        batches.close()


def draws(trainer):
    trainer.reseed(1)
    images, labels, _ = first_batch(trainer.p.train_loader)
    mixed, _ = trainer.p.batch_op(images, labels)
    mask = paddle.nn.functional.dropout(paddle.ones([32]), p=0.5).numpy()
    return [float(images.sum()), float(mixed.sum()), trainer.p.batch_op.last_lam, *mask.tolist()]


def streams():
    ops = [{"OpSampler": {"MixupOperator": {"alpha": 0.8, "prob": 1.0}}}]
    parts = parts_for("streams", train_list=SAME, random_aug=True, Global={"update_freq": 1})
    parts_cfg = parts.cfg["DataLoader"]["Train"]["dataset"]
    from ppcls_ft.data.batch_ops import build_batch_op
    parts.batch_op = build_batch_op(ops, 4)
    assert parts_cfg["transform_ops"][1] == {"RandCropImage": {"size": 32}}
    trainer = Trainer(parts)
    first, again = draws(trainer), draws(trainer)
    return {"ranks": gathered(first), "again_equal": first == again}


class NanAt:
    """The train loss, NaN at its ``k``-th call on this rank."""

    def __init__(self, loss, k):
        self.loss, self.k, self.calls = loss, k, 0

    def __call__(self, logits, target):
        self.calls += 1
        out = self.loss(logits, target)
        if self.calls == self.k:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out


def nan_on_rank1():
    parts = parts_for("nan", FineTune={"freeze_backbone_epochs": 0})
    trainer = Trainer(parts)
    if pdist.get_rank() == 1:
        parts.train_loss = NanAt(parts.train_loss, 4)  # an accumulation boundary (update_freq 2)
    result = trainer.fit()
    return {"diverged_at": result["diverged_at"], "epochs": len(result["history"])}


def empty_batch_on_rank1():
    parts = parts_for("empty", train_list=BAD, shuffle=False, Global={"epochs": 1},
                      FineTune={"freeze_backbone_epochs": 0})
    trainer = Trainer(parts)
    result = trainer.fit()
    return {"ranks": gathered(checksum(parts.model)), "skipped": result["history"][0]["skipped_images"],
            "steps": trainer.state.global_step}


def bn_statistics():
    """Batch norm in train mode: each rank's running statistics drift apart over an epoch;
    sync_running_stats leaves every rank with their mean."""
    parts = parts_for("bn", FineTune={"freeze_backbone_epochs": 0, "freeze_bn_stats": False},
                      Global={"epochs": 1})
    trainer = Trainer(parts)
    trainer.train_epoch(1)
    mean = parts.model.state_dict()["conv1.bn._mean"]
    before = gathered(mean.numpy().ravel()[:8])
    trainer.sync_running_stats()
    return {"before": before, "after": gathered(mean.numpy().ravel()[:8])}


def linear_probe():
    parts = parts_for("probe", FineTune={"freeze_backbone_epochs": 0, "linear_probe": True},
                      Global={"epochs": 1})
    before = {k: v.numpy().copy() for k, v in parts.model.state_dict().items()}
    Trainer(parts).fit()
    after = parts.model.state_dict()
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k].numpy()))
    return {"changed": changed, "ranks": gathered(checksum(parts.model))}


def no_sync():
    parts = parts_for("nosync", FineTune={"freeze_backbone_epochs": 0})
    trainer = Trainer(parts)
    trainer._wrap()
    parts.strategy.train_mode(trainer.model)
    trainer.reseed(1)
    batches = iterate(parts.train_loader)
    fc = dict(trainer.inner.named_parameters())["fc.weight"]
    images, labels, _ = next(batches)
    trainer.train_step(images, labels, 1, 1)          # micro-step: local gradients only
    micro = gathered(fc.grad.numpy().ravel()[:8])
    images, labels, _ = next(batches)
    trainer.train_step(images, labels, 2, 1)          # boundary: all-reduce, then step
    batches.close()
    return {"micro": micro, "after_step": gathered(checksum(trainer.inner)),
            "steps": trainer.state.global_step}


class SigtermAt:
    """The train loss; at its ``k``-th call this rank sends itself SIGTERM, as a scheduler
    preempting one process would."""

    def __init__(self, loss, k):
        self.loss, self.k, self.calls = loss, k, 0

    def __call__(self, logits, target):
        self.calls += 1
        if self.calls == self.k:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
        return self.loss(logits, target)


def sigterm_on_rank1():
    from ppcls_ft.engine.run_guard import run_guard
    parts = parts_for("sigterm", FineTune={"freeze_backbone_epochs": 0})
    trainer = Trainer(parts)
    if pdist.get_rank() == 1:
        parts.train_loss = SigtermAt(parts.train_loss, 3)
    with run_guard(OUT / "sigterm", rank=pdist.get_rank()):
        result = trainer.fit()
    return {"stopped_by": result["stopped_by"], "epochs": len(result["history"]),
            "steps": trainer.state.global_step}


SCENARIOS = {"streams": streams, "nan": nan_on_rank1, "empty": empty_batch_on_rank1,
             "probe": linear_probe, "nosync": no_sync, "bn": bn_statistics,
             "sigterm": sigterm_on_rank1}

if __name__ == "__main__":
    for name, fn in SCENARIOS.items():
        with paddle.utils.unique_name.guard():
            result = fn()
        path = OUT / f"{name}.rank{pdist.get_rank()}.json"
        path.write_text(json.dumps(result))
