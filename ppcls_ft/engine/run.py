"""The three things a user runs: train, evaluate, predict. ``tools/*.py`` call these."""
from pathlib import Path

import numpy as np
import paddle

from ..data.dataset import list_images
from ..errors import ConfigError
from ..inference_format import Postprocessor, Preprocessor, complete_preprocess, format_result, read_label_file
from ..utils.logger import format_values, get_logger
from .builder import build_eval_parts, build_model_for, build_train_parts, class_num_of
from .evaluate import evaluate
from .trainer import Trainer

def train(cfg):
    """Train (or resume) per ``cfg``; returns the results dict also written to train_results.json."""
    # A fresh name scope: optimizer state (.pdopt) is keyed by generated names such as
    # conv2d_3.w_0_velocity_0, so a run must produce the same names whether it is the first in its
    # process or not; otherwise a resumed optimizer cannot find its state.
    with paddle.utils.unique_name.guard():
        parts = build_train_parts(cfg)
        result = Trainer(parts).fit()
    out = Path(cfg["Global"].get("output_dir", "./output")).resolve()
    parts.logger.info(f"results: {out}/train_results.json, checkpoints: {out}/best_model.pdparams, "
                      f"{out}/latest.pdparams, log: {out}/train.log")
    return result


def evaluate_config(cfg):
    """Evaluate ``Global.pretrained_model`` on ``DataLoader.Eval``; returns the metrics."""
    if not (cfg["Global"].get("pretrained_model") or cfg["Arch"].get("pretrained")):
        raise ConfigError("Global.pretrained_model", "is required to evaluate (the weights to test)")
    parts = build_eval_parts(cfg)
    result = evaluate(parts, parts.model)
    images = result.pop("images")
    parts.logger.info(f"[Eval][Avg]{format_values(result)} ({images} images)")
    return result


def infer(cfg):
    """Top-k with label names for ``Infer.infer_imgs`` (an image or a folder); prints and returns.

    The dygraph model with the exported model's pre- and post-processing classes
    (``inference_format``), so tools/infer.py and the Predictor treat an image alike.
    """
    infer_cfg = cfg.get("Infer") or {}
    if "transforms" not in infer_cfg:
        raise ConfigError("Infer.transforms", "is required (the eval preprocessing list)")
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
