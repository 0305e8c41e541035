"""The three things a user runs: train, evaluate, predict. ``tools/*.py`` call these."""
from pathlib import Path

import numpy as np
import paddle

from ..data.transforms import build_transforms
from ..errors import ConfigError
from ..utils.logger import format_values, get_logger
from .builder import build_eval_parts, build_model_for, build_train_parts, class_num_of
from .trainer import Trainer, evaluate

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    parts.logger.info(f"[Eval][Avg]{format_values(result)}")
    return result


def load_label_names(path, class_num=None):
    """PaddleClas ``class_id_map_file``: one ``id name`` per line -> list of names by id."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(" ", 1)
            if not parts[0].isdigit():
                raise ConfigError("Infer.PostProcess.class_id_map_file",
                                  f"{path}:{line_no}: expected 'id name', got {line!r}")
            names[int(parts[0])] = parts[1] if len(parts) > 1 else parts[0]
    size = max(names) + 1 if names else 0
    if class_num:
        size = max(size, class_num)
    return [names.get(i, str(i)) for i in range(size)]


def list_images(path):
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ConfigError("Infer.infer_imgs", f"no images ({', '.join(IMAGE_EXTS)}) under {p}")
        return files
    if not p.is_file():
        raise ConfigError("Infer.infer_imgs", f"{p} is neither an image file nor a folder")
    return [p]


def infer(cfg):
    """Top-k with label names for ``Infer.infer_imgs`` (an image or a folder); prints and returns."""
    infer_cfg = cfg.get("Infer") or {}
    if "transforms" not in infer_cfg:
        raise ConfigError("Infer.transforms", "is required (the eval preprocessing list)")
    logger = get_logger(None)
    model = build_model_for(cfg, logger)
    model.eval()
    transform = build_transforms(infer_cfg["transforms"], path="Infer.transforms")
    post = infer_cfg.get("PostProcess") or {}
    topk = int(post.get("topk", 5))
    names = None
    if post.get("class_id_map_file"):
        names = load_label_names(post["class_id_map_file"], class_num_of(cfg))
    files = list_images(infer_cfg.get("infer_imgs", ""))
    batch = int(infer_cfg.get("batch_size", 8))
    results = []
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        arrays = [_chw(transform(f.read_bytes())) for f in chunk]
        with paddle.no_grad():
            probs = paddle.nn.functional.softmax(model(paddle.to_tensor(np.stack(arrays)))).numpy()
        for f, prob in zip(chunk, probs):
            ids = np.argsort(-prob, kind="stable")[:topk]
            res = {"file_name": str(f), "class_ids": ids.tolist(),
                   "scores": [round(float(prob[j]), 5) for j in ids]}
            if names:
                res["label_names"] = [names[j] for j in ids]
            results.append(res)
            print(f"{f.name}:\tclass id(s): {res['class_ids']}, score(s): {res['scores']}"
                  + (f", label_name(s): {res['label_names']}" if names else ""))
    return results


def _chw(img):
    """The dataset and deploy transpose HWC->CHW when the list has no ToCHWImage; so do we."""
    img = np.asarray(img, dtype="float32")
    return img if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3) else img.transpose(2, 0, 1)
