"""The training loop, read top to bottom: epochs -> steps -> evaluation -> checkpoints -> verdict.

Determinism: every epoch re-seeds Python, numpy, Paddle, the augmentation workers and the batch
operator from ``(Global.seed, epoch)``. A run resumed from ``epoch_N`` therefore replays exactly
the random draws of the uninterrupted run from epoch N+1 on (tests/test_trainer.py checks it).
"""
import json
import math
import os
import random
import time

import numpy as np
import paddle

from ..data.loader import set_epoch
from ..utils.logger import format_eta, format_values
from .checkpoint import load_checkpoint, save_checkpoint, to_tensors
from .diagnosis import diagnose, format_diagnosis
from .strategies import unwrap


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped before the bad step touched the weights."""


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


class Trainer:
    def __init__(self, parts):
        self.p = parts
        self.cfg = parts.cfg
        glob = self.cfg.get("Global") or {}
        self.glob = glob
        self.log = parts.logger
        self.epochs = int(glob.get("epochs", 1))
        self.seed = int(glob.get("seed") or 0)
        self.output_dir = str(glob.get("output_dir", "./output"))
        self.print_every = max(1, int(glob.get("print_batch_step", 10)))
        self.rank = paddle.distributed.get_rank()
        self.epoch = 0          # last completed epoch
        self.global_step = 0    # optimizer steps taken
        self.best_top1, self.best_epoch = -1.0, None
        self.history = []
        if parts.batch_op is not None:
            self.log.info("train top-k is not reported: the batch operator mixes labels, so accuracy "
                          "against one label is meaningless (eval top-k is unaffected)")

    # ------------------------------------------------------------------ loop
    def fit(self):
        if self.glob.get("checkpoints"):
            self.resume(self.glob["checkpoints"])
        if self.p.strategy.active:
            self.log.info(f"fine-tuning strategy: {self.p.strategy.describe()}")
        diverged_at = None
        try:
            for epoch in range(self.epoch + 1, self.epochs + 1):
                record = self.train_epoch(epoch)
                record.update(self.maybe_evaluate(epoch))
                self.history.append(record)
                self.epoch = epoch
                self.save_epoch(epoch, record)
        except TrainingDiverged as exc:
            diverged_at = str(exc)
            self.log.error(f"training stopped: {exc}. Nothing was saved after the last good epoch.")
        verdict = diagnose(self.history, diverged_at)
        self.write_results(verdict, diverged_at)
        self.log.info(format_diagnosis(verdict))
        if self.p.writer is not None:
            self.p.writer.close()
        return {"history": self.history, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "diagnosis": verdict, "diverged_at": diverged_at}

    def reseed(self, epoch):
        s = self.seed * 1000 + epoch
        random.seed(s)
        np.random.seed(s % 2**32)
        paddle.seed(s)
        if self.p.batch_op is not None:
            self.p.batch_op.seed(s)
        set_epoch(self.p.train_loader, epoch)

    def train_epoch(self, epoch):
        p = self.p
        p.strategy.begin_epoch(p.model, epoch, self.log)
        p.strategy.train_mode(p.model)
        self.reseed(epoch)
        if p.train_metrics is not None:
            p.train_metrics.reset()
        iters = p.steps_per_epoch * p.update_freq  # a partial accumulation group at the end is dropped
        avgs, batch_t, reader_t = {}, Average(), Average()
        seen, skipped, start = 0, 0, time.time()
        tic = time.time()
        for it, (images, labels, n_skipped) in enumerate(p.train_loader, 1):
            if it > iters:
                break
            skipped += int(np.asarray(n_skipped).sum())
            reader_t.add(time.time() - tic)
            n = int(images.shape[0])
            if n == 0:
                continue
            losses = self.train_step(images, labels, it, epoch)
            for k, v in losses.items():
                avgs.setdefault(k, Average()).add(v, n)
            seen += n
            batch_t.add(time.time() - tic)
            if it % self.print_every == 0 or it == iters:
                self.log_step(epoch, it, iters, avgs, batch_t, reader_t, seen)
            tic = time.time()
        seconds = time.time() - start
        record = {"epoch": epoch, "train_loss": avgs["loss"].mean if "loss" in avgs else None,
                  "lr": self.current_lr(), "images_per_sec": seen / seconds if seconds else None,
                  "seconds": round(seconds, 2), "skipped_images": skipped}
        record.update({f"train_{k}": v for k, v in self.train_topk().items()})
        summary = format_values({k: a.mean for k, a in avgs.items()} | self.train_topk())
        self.log.info(f"[Train][Epoch {epoch}/{self.epochs}][Avg]{summary}, ips: "
                      f"{record['images_per_sec']:.2f} samples/s, skipped: {skipped} images")
        if skipped:
            self.log.warning(f"{skipped} unreadable images were skipped this epoch (see warnings above)")
        return record

    def train_step(self, images, labels, it, epoch):
        """Batch op, autocast, forward, loss, backward, step on accumulation boundaries, lr, EMA."""
        p = self.p
        targets = labels
        if p.batch_op is not None:
            images, targets = p.batch_op(images, labels)
        with paddle.amp.auto_cast(enable=p.scaler is not None, level=p.amp_level or "O1"):
            logits = p.model(images)
            losses = p.train_loss(logits, targets)
        loss = losses["loss"]
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(f"epoch {epoch}, iteration {it}, optimizer step "
                                   f"{self.global_step + 1}: loss is {value}")
        scaled = loss / p.update_freq
        (p.scaler.scale(scaled) if p.scaler else scaled).backward()
        if it % p.update_freq == 0:
            if p.scaler:
                p.scaler.step(p.optimizer)
                p.scaler.update()
            else:
                p.optimizer.step()
            p.optimizer.clear_grad()
            p.lr_scheduler.step()
            self.global_step += 1
            if p.ema is not None:
                p.ema.update(unwrap(p.model))
        if p.train_metrics is not None and p.batch_op is None:
            p.train_metrics.update(logits.detach(), labels)
        out = {k: float(v) for k, v in losses.items() if k != "loss"}
        out["loss"] = value
        return out

    def train_topk(self):
        if self.p.train_metrics is None or self.p.batch_op is not None:
            return {}
        return self.p.train_metrics.accumulate()

    def current_lr(self):
        return float(self.p.optimizer.get_lr())

    def log_step(self, epoch, it, iters, avgs, batch_t, reader_t, seen):
        values = {k: a.mean for k, a in avgs.items()} | self.train_topk()
        ips = seen / max(batch_t.total, 1e-9)  # images/s over the epoch so far
        remaining = (self.epochs - epoch) * iters + (iters - it)
        self.log.info(
            f"[Train][Epoch {epoch}/{self.epochs}][Iter: {it}/{iters}]lr: {self.current_lr():.8f}, "
            f"{format_values(values)}, batch_cost: {batch_t.mean:.5f}s, reader_cost: "
            f"{reader_t.mean:.5f}s, ips: {ips:.5f} samples/s, "
            f"eta: {format_eta(remaining * batch_t.mean)}")
        step = (epoch - 1) * iters + it
        if self.p.writer is not None:
            self.p.writer.add_scalars({"lr": self.current_lr(), "ips": ips}
                                      | values, step, prefix="train_")

    # ------------------------------------------------------------ evaluation
    def maybe_evaluate(self, epoch):
        g = self.glob
        due = (g.get("eval_during_train", True) and self.p.eval_loader is not None
               and epoch >= int(g.get("start_eval_epoch", 0))
               and (epoch % int(g.get("eval_interval", 1)) == 0 or epoch == self.epochs))
        if not due:
            return {}
        result = {f"eval_{k}": v for k, v in evaluate(self.p, self.p.model).items()}
        if self.p.ema is not None:
            with self.p.ema.apply_to(unwrap(self.p.model)):
                result.update({f"eval_ema_{k}": v for k, v in evaluate(self.p, self.p.model).items()})
        self.log.info(f"[Eval][Epoch {epoch}][Avg]{format_values({k[5:]: v for k, v in result.items()})}")
        if self.p.writer is not None:
            self.p.writer.add_scalars(result, epoch)
        return result

    # ----------------------------------------------------------- checkpoints
    def states(self):
        p = self.p
        return {"epoch": self.epoch, "global_step": self.global_step, "metric": self.best_top1,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "history": self.history,
                "seed": self.seed, "lr_scheduler": p.lr_scheduler.state_dict(),
                "batch_op": p.batch_op.state_dict() if p.batch_op is not None else None,
                "config": self.cfg}

    def save(self, name):
        if self.rank != 0:
            return
        p = self.p
        save_checkpoint(os.path.join(self.output_dir, name), unwrap(p.model).state_dict(),
                        p.optimizer.state_dict(), self.states(),
                        p.ema.state_dict() if p.ema is not None else None)

    def save_epoch(self, epoch, record):
        top1 = record.get("eval_top1")
        if top1 is not None and top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, epoch
            self.save("best_model")
            self.log.info(f"[Eval][Epoch {epoch}] best top1 so far: {top1:.5f} -> best_model")
        self.save("latest")
        if epoch % int(self.glob.get("save_interval", 1)) == 0:
            self.save(f"epoch_{epoch}")
        self.write_results(None, None)

    def resume(self, prefix):
        p = self.p
        ck = load_checkpoint(prefix)
        unwrap(p.model).set_state_dict(to_tensors(ck["params"]))
        p.optimizer.set_state_dict(to_tensors(ck["opt"]))
        st = ck["states"]
        p.lr_scheduler.set_state_dict(st["lr_scheduler"])
        if p.ema is not None and ck["ema"] is not None:
            p.ema.set_state_dict(ck["ema"])
        if p.batch_op is not None and st.get("batch_op"):
            p.batch_op.set_state_dict(st["batch_op"])
        self.epoch, self.global_step = int(st["epoch"]), int(st["global_step"])
        self.best_top1 = float(st.get("best_top1", st.get("metric", -1.0)))
        self.best_epoch = st.get("best_epoch")
        self.history = list(st.get("history") or [])
        self.log.info(f"resumed from {prefix}: epoch {self.epoch}, step {self.global_step}, "
                      f"best top1 {self.best_top1:.5f}, lr {self.current_lr():.8f}")

    def write_results(self, verdict, diverged_at):
        if self.rank != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        data = {"epochs": self.history, "best_epoch": self.best_epoch,
                "best_top1": self.best_top1 if self.best_epoch is not None else None,
                "diverged_at": diverged_at, "diagnosis": verdict}
        path = os.path.join(self.output_dir, "train_results.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(path + ".tmp", path)


def evaluate(parts, model):
    """Loss terms and top-k over the eval loader; returns floats, e.g. {'loss', 'CELoss', 'top1'}.

    Leaves the model in eval mode: the next epoch's ``strategy.train_mode`` decides what trains.
    """
    model.eval()
    metrics = parts.eval_metrics
    if metrics is not None:
        metrics.reset()
    avgs, skipped = {}, 0
    with paddle.no_grad():
        for images, labels, n_skipped in parts.eval_loader:
            skipped += int(np.asarray(n_skipped).sum())
            n = int(images.shape[0])
            if n == 0:
                continue
            logits = model(images)
            if parts.eval_loss is not None:
                for k, v in parts.eval_loss(logits, labels).items():
                    avgs.setdefault(k, Average()).add(float(v), n)
            if metrics is not None:
                metrics.update(logits, labels)
    if paddle.distributed.get_world_size() > 1:  # every rank evaluated a shard: sum them
        for a in avgs.values():
            t = paddle.to_tensor([a.total, float(a.count)], dtype="float64")
            paddle.distributed.all_reduce(t)
            a.total, a.count = float(t[0]), int(t[1])
        if metrics is not None:
            metrics.all_reduce()
    if skipped:
        parts.logger.warning(f"[Eval] {skipped} unreadable images were skipped (see warnings above); "
                             "metrics cover the readable ones only")
    out = {k: a.mean for k, a in avgs.items()}
    if metrics is not None:
        out.update(metrics.accumulate())
    return out
