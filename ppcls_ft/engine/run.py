"""The three things a user runs: train, evaluate, predict. ``tools/*.py`` call these."""
from pathlib import Path

import numpy as np
import paddle

from ..data.dataset import list_images
from ..data.loader import close
from ..errors import ConfigError
from ..inference_format import Postprocessor, Preprocessor, complete_preprocess, format_result, read_label_file
from ..utils import distributed as dist
from ..utils.logger import format_values, get_logger
from .builder import build_eval_parts, build_model_for, build_train_parts, class_num_of
from .analysis import ClassStats, format_per_class, write_eval_results
from .evaluate import evaluate
from .report import class_results
from .run_guard import run_guard
from .trainer import Trainer

def train(cfg):
    """Train (or resume) per ``cfg``; returns the results dict also written to train_results.json."""
    # A fresh name scope: optimizer state (.pdopt) is keyed by generated names such as
    # conv2d_3.w_0_velocity_0, so a run must produce the same names whether it is the first in its
    # process or not; otherwise a resumed optimizer cannot find its state.
    out = Path(cfg["Global"].get("output_dir", "./output")).resolve()
    # The output folder is locked and stop signals are caught before anything is written there.
    with run_guard(out, rank=dist.rank()), paddle.utils.unique_name.guard():
        parts = build_train_parts(cfg)
        try:
            result = Trainer(parts).fit()
        finally:  # the loaders' workers persist from epoch to epoch; not past the run
            for loader in (parts.train_loader, parts.eval_loader):
                if loader is not None:
                    close(loader)
    parts.logger.info(f"results: {out}/train_results.json, checkpoints: {out}/best_model.pdparams, "
                      f"{out}/latest.pdparams, log: {out}/train.log")
    return result


def evaluate_config(cfg):
    """Evaluate ``Global.pretrained_model`` on ``DataLoader.Eval``; returns the metrics."""
    _require_weights(cfg, "evaluate (the weights to test)")
    parts = build_eval_parts(cfg)
    stats = ClassStats(parts.model.class_num)
    try:
        result = evaluate(parts, parts.model, stats)
    finally:
        close(parts.eval_loader)
    images = result.pop("images")
    parts.logger.info(f"[Eval][Avg]{format_values(result)} ({images} images)")
    per_class = class_results(cfg, stats, parts.eval_loader)
    if paddle.distributed.get_rank() == 0:
        out = Path(cfg["Global"].get("output_dir", "./output"))
        path, png = write_eval_results(out, per_class)
        parts.logger.info(f"per-class results: {path}, {png}")
        parts.logger.info(format_per_class(per_class))
    return result | {"per_class": per_class["per_class"],
                     "confusion_matrix": per_class["confusion_matrix"]}


def _require_weights(cfg, to_do):
    if not (cfg["Global"].get("pretrained_model") or cfg["Arch"].get("pretrained")):
        raise ConfigError("Global.pretrained_model", f"is required to {to_do}")


def infer(cfg):
    """Top-k with label names for ``Infer.infer_imgs`` (an image or a folder); prints and returns.

    The dygraph model with the exported model's pre- and post-processing classes
    (``inference_format``), so tools/infer.py and the Predictor treat an image alike.
    """
    infer_cfg = cfg.get("Infer") or {}
    if "transforms" not in infer_cfg:
        raise ConfigError("Infer.transforms", "is required (the eval preprocessing list)")
    _require_weights(cfg, "predict (without it the classifier is random)")
    logger = get_logger(None)
    model = build_model_for(cfg, logger, for_training=False)
    model.eval()
    preprocess = Preprocessor(complete_preprocess(infer_cfg["transforms"]), "Infer.transforms")
    post = infer_cfg.get("PostProcess") or {}
    names = None
    if post.get("class_id_map_file"):
        names = read_label_file(post["class_id_map_file"], class_num_of(cfg),
                                "Infer.PostProcess.class_id_map_file")
    postprocess = Postprocessor(int(post.get("topk", 5)), names)
    files = list_images(infer_cfg.get("infer_imgs", ""), "Infer.infer_imgs")
    batch = int(infer_cfg.get("batch_size", 8))
    results = []
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        arrays = np.stack([preprocess(f) for f in chunk])
        with paddle.no_grad():
            probs = paddle.nn.functional.softmax(model(paddle.to_tensor(arrays))).numpy()
        for res in postprocess(probs, chunk):
            results.append(res)
            print(format_result(res))
    return results
