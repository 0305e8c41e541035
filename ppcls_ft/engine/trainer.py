"""The training loop, read top to bottom: epochs -> steps -> evaluation -> checkpoints -> verdict.

Determinism: every random draw derives from one seed tree (``utils.seeding``: seed -> rank ->
epoch -> stream). A run resumed from ``epoch_N`` replays exactly the draws of the uninterrupted
run from epoch N+1 on, and every rank of a multi-device run draws its own.

A stop signal (SIGTERM, Ctrl-C) ends the run between two steps, abandoning the epoch in progress
(``engine/run_guard.py``); ``latest`` keeps the last finished one.

Several devices (``paddle.distributed.launch``): before each forward pass the ranks agree on
whether any has an empty batch or a stop signal; after it, in one small all-reduce, on the global
loss, the image count and whether any rank saw a non-finite loss. So a NaN or SIGTERM on one rank
stops every rank at the same step and an empty batch is skipped by all, instead of leaving the
others waiting forever in the gradient all-reduce (which ``Global.update_freq`` micro-steps skip).
"""
import contextlib
import math
import os
import time

import numpy as np
import paddle

from ..data.loader import iterate, set_epoch
from ..errors import DataError
from ..utils import distributed as dist
from ..utils.device import rss_mib
from ..utils.logger import format_eta, format_values
from ..utils.seeding import BATCH_OP, SeedTree
from .analysis import ClassStats, format_per_class
from .checkpoint import build_states, float32_state, save_checkpoint
from .diagnosis import diagnose, early_stop, format_diagnosis
from .evaluate import Average, evaluate, loss_keys
from .frozen import FrozenBackbone
from .report import class_results, write_run_report
from .results import resume_hint, write_results
from .run_guard import RunStopped, stop_requested
from .strategies import unwrap
from .resume import restore, resume_source
from .train_state import TrainState


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped before the bad step touched the weights."""


class Trainer:
    def __init__(self, parts):
        self.p = parts
        self.cfg = parts.cfg
        self.glob = glob = self.cfg.get("Global") or {}
        self.log = parts.logger
        self.epochs = int(glob.get("epochs", 1))
        self.output_dir = str(glob.get("output_dir", "./output"))
        self.print_every = max(1, int(glob.get("print_batch_step", 10)))
        self.save_interval = int(glob.get("save_interval", 1))  # 0: no epoch_N files (PaddleClas)
        self.rank = dist.rank()
        self.state = TrainState(seed=int(glob.get("seed") or 0))
        self.inner = unwrap(parts.model)   # what is evaluated, saved and EMA-averaged
        self.model = self.inner            # what trains: paddle.DataParallel(inner) on 2+ devices
        self._reduced = None               # the trainable parameters the reducer was built for
        self._retired = []                 # earlier DataParallel wrappers (see _wrap)
        self._pending = False              # a backward ran since the last optimizer step
        self._contributed = 0              # ... and how many, of update_freq
        self._loss_keys = loss_keys(parts.train_loss, self.inner.class_num)  # fixed all-reduce layout
        self._last_stats = self._best_stats = None  # (epoch, analysis.ClassStats) of evals
        self._best_results = None
        self.frozen = FrozenBackbone(parts, self.inner, self.log)
        if parts.batch_op is not None:
            self.log.info("train top-k is not reported: the batch operator mixes labels, so accuracy "
                          "against one label is meaningless (eval top-k is unaffected)")

    # Read-only views kept for callers of the first release (tests, notebooks).
    epoch = property(lambda self: self.state.epoch)
    best_top1 = property(lambda self: self.state.best_top1)
    history = property(lambda self: self.state.history)

    # ------------------------------------------------------------------ loop
    def fit(self):
        prefix = resume_source(self.glob, self.output_dir, self.log)
        if prefix:
            restore(self.p, self.inner, self.state, prefix, self.log)
        strategy = self.p.strategy
        if strategy.active or strategy.freeze_bn_stats:
            self.log.info(f"fine-tuning strategy: {strategy.describe()}")
        diverged_at = stopped = stopped_by = None
        began = time.time()
        try:
            for epoch in range(self.state.epoch + 1, self.epochs + 1):
                record = self.train_epoch(epoch)
                self.sync_running_stats()
                record.update(self.maybe_evaluate(epoch))
                # wall time of this process so far, evaluation included: "minutes to 0.90"
                record["elapsed_seconds"] = round(time.time() - began, 2)
                # resident memory after the epoch: the heap's high-water mark (freed memory is
                # kept for reuse, _cpu.keep_freed_memory), so growth across epochs is what to watch
                record["rss_mib"] = rss_mib()
                self.state.history.append(record)
                self.state.epoch = epoch
                self.save_epoch(epoch, record)
                stopped = early_stop(self.state.history, self.glob)
                if stopped:
                    self.log.info(f"early stop after epoch {epoch}: {stopped}")
                    break
        except TrainingDiverged as exc:
            diverged_at = str(exc)
            self.log.error(f"training stopped: {exc}. Nothing was saved after the last good epoch.")
        except RunStopped as exc:
            stopped_by = exc.signal
            self.log.error(f"training {exc}; {resume_hint(self.output_dir, self.state, self.epochs)}")
        verdict = diagnose(self.state.history, diverged_at, stopped)
        self.write_results(verdict, diverged_at, stopped, stopped_by)
        self.log.info(format_diagnosis(verdict))
        if self.p.writer is not None:
            self.p.writer.close()
        st = self.state
        return {"history": st.history, "best_top1": st.best_top1, "best_epoch": st.best_epoch,
                "diagnosis": verdict, "diverged_at": diverged_at, "stopped_early": stopped,
                "stopped_by": stopped_by, "eval_results": self._best_results}

    def reseed(self, epoch):
        tree, rank = SeedTree(self.state.seed), self.rank
        tree.seed_process(rank, epoch)
        if self.p.batch_op is not None:
            self.p.batch_op.seed(tree.epoch_seed(rank, epoch, BATCH_OP))
        set_epoch(self.p.train_loader, epoch)

    def _wrap(self):
        """(Re)build DataParallel when what trains changed: its reducer only knows the
        parameters trainable when it was built (freeze-then-unfreeze changes them).

        The replaced wrapper is kept alive: its reducer's hooks stay attached to the parameters
        it knew, and freeing it makes the next backward crash (measured: SIGSEGV in
        ``EagerReducer::AddDistHook``). Idle, those hooks return at once; it costs the gradient
        buffers of the parameters it knew, once per freeze/unfreeze change.
        """
        trainable = tuple(id(q) for q in self.inner.parameters() if not q.stop_gradient)
        if dist.world_size() > 1 and trainable != self._reduced:
            if self.model is not self.inner:
                self._retired.append(self.model)
            self.model = dist.wrap(self.inner)
            self._reduced = trainable

    def train_epoch(self, epoch):
        p = self.p
        p.strategy.begin_epoch(self.inner, epoch, self.log)
        self._wrap()
        p.strategy.train_mode(self.model)
        self.reseed(epoch)
        if p.train_metrics is not None:
            p.train_metrics.reset()
        iters = p.steps_per_epoch * p.update_freq  # a partial accumulation group at the end is dropped
        avgs, batch_t, reader_t, seen, skipped = {}, Average(), Average(), 0, 0
        start = time.time()
        # a frozen backbone: forward-only, or its cached features (engine/frozen.py)
        forward, batches = self.frozen.plan(epoch) or (None, None)
        tic = time.time()
        for it, (images, labels, n_skipped) in enumerate(batches or iterate(p.train_loader), 1):
            if it > iters:
                break
            skipped += int(np.asarray(n_skipped).sum())
            reader_t.add(time.time() - tic)
            losses, n_global = self.train_step(images, labels, it, epoch, forward)
            for k, v in losses.items():
                avgs.setdefault(k, Average()).add(v, n_global)
            seen += int(images.shape[0])
            batch_t.add(time.time() - tic)
            if it % self.print_every == 0 or it == iters:
                self.log_step(epoch, it, iters, avgs, batch_t, reader_t, seen)
            tic = time.time()
        if "loss" not in avgs:  # no rank took a step (they agree on skipping): all stop here
            raise DataError(f"epoch {epoch}: no image of DataLoader.Train was readable (warnings above)")
        seconds = time.time() - start
        skipped = int(dist.all_sum([skipped])[0])  # every rank's, not rank 0's alone
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

    def train_step(self, images, labels, it, epoch, forward=None):
        """Batch op, autocast, forward, loss, agree, backward, step on accumulation boundaries.
        ``forward`` replaces the model's (a frozen backbone's fast path: engine/frozen.py).

        Returns ``(loss means over every rank's images, their count)``; ``({}, 0)`` when skipped.
        """
        p = self.p
        n = int(images.shape[0])
        boundary = it % p.update_freq == 0
        where = f"epoch {epoch}, iteration {it}, optimizer step {self.state.global_step + 1}"
        # Agree on skipping *before* the forward pass: a DataParallel forward arms the gradient
        # all-reduce of the next backward, so a rank must not run one that others skip.
        agreed = dist.all_sum([0.0 if n else dist.bit(self.rank), 1.0 if stop_requested() else 0.0])
        if agreed[1]:  # a stop signal on any rank: every rank ends here, before this step
            raise RunStopped(stop_requested() or "a stop signal on another rank", where)
        empty = dist.ranks_in_mask(agreed[0])
        if empty:
            if dist.world_size() > 1:
                self.log.warning(f"{where}: rank {', '.join(map(str, empty))} had no readable image "
                                 "in its batch; every rank skips this batch")
            if boundary and self._pending:  # the backward that would have synced did not run
                dist.sync_grads_(q for q in self.inner.parameters() if not q.stop_gradient)
                self._optimizer_step()
            elif boundary:  # a whole accumulation group without an image: no step at all
                self._contributed = 0
            return {}, 0
        micro = not boundary and self.model is not self.inner
        with self.model.no_sync() if micro else contextlib.nullcontext():
            targets = labels
            if p.batch_op is not None:
                images, targets = p.batch_op(images, labels)
            with p.amp.autocast():
                logits = (forward or self.model)(images)
            logits = logits.astype("float32")  # loss and metrics in fp32 under AMP
            losses = p.train_loss(logits, targets)
            means, count = self._agree(losses, n, where)
            # DataParallel averages the ranks' gradients; weighting each rank by its share of
            # the images makes that the gradient of the mean over all images even when a rank
            # lost some to unreadable files (the factor is 1 when the batches are equal).
            share = n * dist.world_size() / count
            scaled = losses["loss"] * (share / p.update_freq)
            (p.scaler.scale(scaled) if p.scaler else scaled).backward()
        self._pending = True
        self._contributed += 1
        if boundary:
            self._optimizer_step()
        if p.train_metrics is not None and p.batch_op is None:
            p.train_metrics.update(logits.detach(), labels)
        return means, count

    def _agree(self, losses, n, where):
        """One all-reduce: the global loss sums and image count, and which ranks saw a NaN."""
        keys = self._loss_keys
        values = [float(losses[k]) for k in keys]
        bad = not all(math.isfinite(v) for v in values)
        local = [n, dist.bit(self.rank) if bad else 0.0] + [0.0 if bad else v * n for v in values]
        total = dist.all_sum(local)
        nonfinite = dist.ranks_in_mask(total[1])
        if nonfinite:
            on = f" on rank {', '.join(map(str, nonfinite))}" if dist.world_size() > 1 else ""
            shown = values[keys.index("loss")] if bad else "nan"
            raise TrainingDiverged(f"{where}: loss is not finite{on} ({shown})")
        count = int(total[0])
        return {k: total[2 + i] / count for i, k in enumerate(keys)}, count

    def _optimizer_step(self):
        p = self.p
        if 0 < self._contributed < p.update_freq:  # skipped micro-steps: average what ran
            with paddle.no_grad():
                for q in self.inner.parameters():
                    if q.grad is not None:
                        paddle.assign(q.grad * (p.update_freq / self._contributed), q.grad)
        self._contributed = 0
        if p.scaler:
            p.scaler.step(p.optimizer)
            p.scaler.update()
        else:
            p.optimizer.step()
        p.optimizer.clear_grad()
        p.lr_scheduler.step()
        self._pending = False
        self.state.global_step += 1
        if p.ema is not None:
            p.ema.update(self.inner)

    def train_topk(self):
        metrics = self.p.train_metrics  # none with a batch op: mixed labels have no top-k
        return metrics.accumulate() if metrics is not None and self.p.batch_op is None else {}

    def current_lr(self):
        return float(self.p.optimizer.get_lr())

    def log_step(self, epoch, it, iters, avgs, batch_t, reader_t, seen):
        values = {k: a.mean for k, a in avgs.items()} | self.train_topk()
        ips = seen / max(batch_t.total, 1e-9)  # this device's images/s over the epoch so far
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
    def sync_running_stats(self):
        """Average batch-norm running statistics over ranks (each saw its own shard), so every
        rank evaluates, and rank 0 saves, the same function."""
        if dist.world_size() < 2:
            return
        from ..optim.ema import running_stat_names
        names = running_stat_names(self.inner)
        state = self.inner.state_dict(use_hook=False)
        dist.average_(state[k] for k in sorted(names))
        if self.p.ema is not None:
            dist.average_(self.p.ema.shadow[k] for k in sorted(names))

    def maybe_evaluate(self, epoch):
        g = self.glob
        due = (g.get("eval_during_train", True) and self.p.eval_loader is not None
               and epoch >= int(g.get("start_eval_epoch", 0))
               and (epoch % int(g.get("eval_interval", 1)) == 0 or epoch == self.epochs))
        if not due:
            return {}
        stats = ClassStats(self.inner.class_num)
        metrics = evaluate(self.p, self.inner, stats)
        self._last_stats = (epoch, stats)
        images = metrics.pop("images")
        result = {f"eval_{k}": v for k, v in metrics.items()}
        if self.p.ema is not None:
            with self.p.ema.apply_to(self.inner):
                ema = evaluate(self.p, self.inner)
            ema.pop("images")
            result.update({f"eval_ema_{k}": v for k, v in ema.items()})
        self.log.info(f"[Eval][Epoch {epoch}][Avg]{format_values({k[5:]: v for k, v in result.items()})}"
                      f" ({images} images)")
        if self.p.writer is not None:
            self.p.writer.add_scalars(result, epoch)
        return result | {"eval_images": images}

    # ----------------------------------------------------------- checkpoints
    def save(self, name):
        if self.rank != 0:
            return
        p = self.p
        states = build_states(
            self.state, lr_scheduler=p.lr_scheduler.state_dict(),
            batch_op=p.batch_op.state_dict() if p.batch_op is not None else None,
            scaler=p.scaler.state_dict() if p.scaler is not None else None, config=self.cfg,
            steps_per_epoch=p.steps_per_epoch)
        save_checkpoint(os.path.join(self.output_dir, name), float32_state(self.inner),
                        p.optimizer.state_dict(), states,
                        p.ema.state_dict() if p.ema is not None else None)

    def save_epoch(self, epoch, record):
        top1 = record.get("eval_top1")
        st = self.state
        st.strategy = self.p.strategy.state_dict()
        if top1 is not None and top1 > st.best_top1:
            st.best_top1, st.best_epoch = top1, epoch
            self._best_stats = self._last_stats
            self.save("best_model")
            self.log.info(f"[Eval][Epoch {epoch}] best top1 so far: {top1:.5f} -> best_model")
        self.save("latest")
        if self.save_interval > 0 and epoch % self.save_interval == 0:
            self.save(f"epoch_{epoch}")
        self.write_results(None, None)

    def write_results(self, verdict, diverged_at, stopped=None, stopped_by=None):
        """``train_results.json``; at the end (``verdict`` given) also the per-class results of
        the best epoch seen in this process and ``report.html``."""
        if self.rank != 0:
            return
        st = self.state
        write_results(self.output_dir, st, verdict, diverged_at, stopped_by, stopped)
        if verdict is None:
            return
        chosen = self._best_stats or self._last_stats
        if chosen is not None:
            self._best_results = class_results(self.cfg, chosen[1], self.p.eval_loader, chosen[0])
            self.log.info(f"epoch {chosen[0]} " + format_per_class(self._best_results))
        report = write_run_report(self.output_dir, self.cfg, st.history, verdict,
                                  self._best_results, stopped)
        self.log.info(f"report: {report}")
