"""Config -> the objects of a training or evaluation run, top to bottom, like a recipe.

Each builder receives its own section plus explicit cross-section values (``class_num``,
``epochs``, ``steps_per_epoch``); nothing here mutates the config.
"""
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from ..config import save_config
from ..data.batch_ops import build_batch_op
from ..data.loader import build_dataloader, limit_batches, start_workers
from ..errors import ConfigError, WeightsError
from ..losses import build_loss
from ..metrics import build_metrics
from ..models import build_model, load_pretrained
from ..optim import build_lr_scheduler, build_optimizer
from ..optim.optimizer import materialize_accumulators
from ..optim.ema import ModelEMA
from ..utils import distributed as dist
from ..utils.device import setup_device
from ..utils.logger import ScalarWriter, get_logger
from .amp import AmpPolicy, amp_policy
from .strategies import FineTuneStrategy


@dataclass
class RunParts:
    """Everything a Trainer needs, built from one config."""
    cfg: dict
    logger: Any
    device: str
    model: Any
    train_loader: Any = None
    eval_loader: Any = None
    train_loss: Any = None
    eval_loss: Any = None
    batch_op: Any = None
    lr_scheduler: Any = None
    optimizer: Any = None
    amp: AmpPolicy = None
    scaler: Any = None
    ema: Any = None
    train_metrics: Any = None
    eval_metrics: Any = None
    writer: Any = None
    strategy: Any = None
    update_freq: int = 1
    steps_per_epoch: int = 0


def seed_everything(seed):
    """Seed Python, numpy and Paddle alike on every rank, so that model construction (a new
    classifier head) is identical everywhere; the loop re-seeds per (rank, epoch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    paddle.seed(seed)


def _device_wanted(glob):
    """'gpu' when the config asks for a GPU and this Paddle can use one, else 'cpu'."""
    from ..utils.device import gpu_available
    wants = str(glob.get("device", "cpu")).lower().startswith("gpu")
    return "gpu" if wants and gpu_available() else "cpu"


def global_cfg(cfg):
    return cfg.get("Global") or {}


def class_num_of(cfg):
    arch = cfg["Arch"]
    if "class_num" not in arch:
        raise ConfigError("Arch.class_num", "must be set (the number of classes in your dataset)")
    return int(arch["class_num"])


def build_model_for(cfg, logger, pretrained_model=None, for_training=True):
    """Model from ``Arch`` (which loads ``Arch.pretrained``), then ``Global.pretrained_model``.

    Outside training (eval, infer) a classifier re-initialised for another class count would
    score a random head, so that is an error there instead of a fine-tuning convenience.
    """
    source = pretrained_model if pretrained_model is not None else global_cfg(cfg).get("pretrained_model")
    # Global.pretrained_model replaces every weight, so an Arch.pretrained download is skipped
    # (PaddleClas loads both, so an offline eval of a config with pretrained: True fails).
    model = build_model(cfg["Arch"], load_weights=not source, logger=logger.info)
    if source:
        strict = bool(cfg["Arch"].get("load_strict", True))
        report = load_pretrained(model, source, strict=strict, logger=logger.info)  # logs its report
        if not for_training and report.head_reinitialised is not None:
            raise WeightsError(f"{report.path}: its classifier does not fit Arch.class_num="
                               f"{report.head_reinitialised}; set Arch.class_num to the class count "
                               "these weights were trained with")
    return model


def build_eval_parts(cfg, logger=None, pretrained_model=None):
    """Model + eval loader + eval loss/metrics for ``tools/eval.py``."""
    glob = global_cfg(cfg)
    dist.init(_device_wanted(glob))  # launched on several devices, each evaluates a shard
    logger = logger or get_logger(None, rank=dist.rank())
    device, _ = setup_device(glob.get("device", "cpu"), glob.get("cpu_threads"), logger)
    seed_everything(int(glob.get("seed") or 0))
    model = build_model_for(cfg, logger, pretrained_model, for_training=False)
    class_num = class_num_of(cfg)
    loader = _eval_loader(cfg, class_num, int(glob.get("seed") or 0))
    if loader is None:
        raise ConfigError("DataLoader.Eval", "is required to evaluate")
    amp = amp_policy(cfg.get("AMP"), device)
    model, _ = amp.decorate(model, None)
    return RunParts(cfg=cfg, logger=logger, device=device, model=model, eval_loader=loader,
                    eval_loss=_loss(cfg, "Eval"), eval_metrics=_metrics(cfg, "Eval"), amp=amp)


def _loss(cfg, mode):
    entries = (cfg.get("Loss") or {}).get(mode)
    if not entries:
        return None
    return build_loss(entries, path=f"Loss.{mode}")


def _metrics(cfg, mode):
    entries = (cfg.get("Metric") or {}).get(mode)
    return build_metrics(entries, path=f"Metric.{mode}") if entries else None


def _eval_loader(cfg, class_num, seed):
    section = (cfg.get("DataLoader") or {}).get("Eval")
    if section is None:
        return None
    return build_dataloader(section, "Eval", seed=seed, class_num=class_num, path="DataLoader.Eval")


def build_train_parts(cfg):
    """Everything for ``tools/train.py``: seed/device, data, model, loss, batch op, lr+optimizer,
    AMP/EMA, metrics, writer. Resume is done by the Trainer (it owns the loop state)."""
    glob = global_cfg(cfg)
    dist.init(_device_wanted(glob))
    rank = dist.rank()
    out_dir = Path(glob.get("output_dir", "./output"))
    logger = get_logger(out_dir, rank=rank)
    device, _ = setup_device(glob.get("device", "cpu"), glob.get("cpu_threads"), logger)
    seed = int(glob.get("seed") or 0)
    seed_everything(seed)
    if rank == 0:
        save_config(cfg, out_dir)
    if glob.get("to_static"):
        # Measured slower than dygraph for CPU training (shared/guide/PERFORMANCE.md §2); a GPU
        # to_static path is not implemented yet, so say so rather than pretend.
        logger.warning("Global.to_static: True is ignored; training runs in dygraph")
    if glob.get("use_dali"):
        logger.warning("Global.use_dali: True is ignored; images are decoded with OpenCV workers")
    class_num = class_num_of(cfg)
    epochs = int(glob.get("epochs", 1))

    train_section = (cfg.get("DataLoader") or {}).get("Train")
    if train_section is None:
        raise ConfigError("DataLoader.Train", "is required to train")
    train_loader = build_dataloader(train_section, "Train", seed=seed, class_num=class_num,
                                    path="DataLoader.Train")
    eval_loader = _eval_loader(cfg, class_num, seed)
    for loader in (train_loader, eval_loader):  # before the model: see start_workers
        if loader is not None:
            start_workers(loader)
    batch_op = build_batch_op(train_section["dataset"].get("batch_transform_ops"), class_num,
                              path="DataLoader.Train.dataset.batch_transform_ops")

    model = build_model_for(cfg, logger)
    model = _maybe_sync_bn(model, cfg, device, logger)
    strategy = FineTuneStrategy.from_config(cfg.get("FineTune"), model, epochs)
    train_loss = _train_loss(cfg, train_loader, class_num)

    update_freq = int(glob.get("update_freq", 1))
    if update_freq < 1:
        raise ConfigError("Global.update_freq", f"must be >= 1, got {update_freq}")
    steps_per_epoch = len(train_loader) // update_freq
    if steps_per_epoch < 1:
        raise ConfigError("Global.update_freq", f"is {update_freq} but an epoch has only "
                                                f"{len(train_loader)} batches; lower it or the batch size")
    limit_batches(train_loader, steps_per_epoch * update_freq)  # a partial group is dropped
    opt_cfg = cfg.get("Optimizer")
    if opt_cfg is None:
        raise ConfigError("Optimizer", "is required to train (e.g. name: Momentum, lr: {name: Cosine, ...})")
    lr_scheduler = build_lr_scheduler(opt_cfg["lr"], epochs=epochs, steps_per_epoch=steps_per_epoch,
                                      path="Optimizer.lr")
    optimizer = build_optimizer(opt_cfg, model, lr_scheduler, path="Optimizer",
                                layer_decay=strategy.layer_decay)

    amp = amp_policy(cfg.get("AMP"), device)
    if amp.note:
        (logger.info if amp.enabled else logger.warning)(amp.note)
    model, optimizer = amp.decorate(model, optimizer)
    materialize_accumulators(optimizer)  # so a checkpoint taken while frozen resumes past the unfreeze
    ema = ModelEMA(model, decay=float(cfg["EMA"].get("decay", 0.9999))) if cfg.get("EMA") is not None else None
    _log_batch_sizes(logger, train_section, update_freq)
    # The model stays unwrapped here: the Trainer wraps it in paddle.DataParallel when launched on
    # several devices, and again whenever the fine-tuning strategy changes what trains.
    writer = ScalarWriter(out_dir / "vdl", enabled=bool(glob.get("use_visualdl", False)), rank=rank)
    return RunParts(cfg=cfg, logger=logger, device=device, model=model, train_loader=train_loader,
                    eval_loader=eval_loader, train_loss=train_loss, eval_loss=_loss(cfg, "Eval"),
                    batch_op=batch_op, lr_scheduler=lr_scheduler, optimizer=optimizer, amp=amp,
                    scaler=amp.make_scaler(), ema=ema, train_metrics=_metrics(cfg, "Train"),
                    eval_metrics=_metrics(cfg, "Eval"), writer=writer, strategy=strategy,
                    update_freq=update_freq, steps_per_epoch=steps_per_epoch)


def _train_loss(cfg, train_loader, class_num):
    """``Loss.Train``; the label counts resolve ``CELoss.class_weight: auto``."""
    if not (cfg.get("Loss") or {}).get("Train"):
        raise ConfigError("Loss.Train", "is required, e.g. [{CELoss: {weight: 1.0}}]")
    counts = np.bincount(np.asarray(train_loader.dataset.labels), minlength=class_num).tolist()
    return build_loss(cfg["Loss"]["Train"], path="Loss.Train", class_counts=counts)


def _log_batch_sizes(logger, train_section, update_freq):
    """One line users check first on a multi-device run: who is where, and the real batch."""
    per_device = int((train_section.get("sampler") or {}).get("batch_size", 0))
    world = dist.world_size()
    logger.info(f"world size {world} (this is rank {dist.rank()}): batch {per_device} per device, "
                f"{per_device * world} global per iteration, {per_device * world * update_freq} "
                f"per optimizer step (Global.update_freq {update_freq})")


def _maybe_sync_bn(model, cfg, device, logger):
    """``Arch.use_sync_bn`` (PaddleClas): convert batch norm to SyncBatchNorm on multi-GPU runs."""
    if not cfg["Arch"].get("use_sync_bn"):
        return model
    if device != "gpu" or dist.world_size() < 2:
        logger.warning("Arch.use_sync_bn has no effect here: it needs 2+ GPUs (Paddle has no CPU "
                       "sync_batch_norm kernel); batch norm stays per device, and its running "
                       "statistics are averaged across devices after every epoch")
        return model
    logger.info("Arch.use_sync_bn: batch norm synchronised across devices (SyncBatchNorm)")
    return paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
