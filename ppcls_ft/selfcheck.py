"""End-to-end checks of the multi-device and mixed-precision paths, on this machine.

``tools/check_gpu.py`` runs them for a person with one or more GPUs (the code path the CPU suite
exercises through gloo processes and bfloat16, on the real devices); the suite uses the same
helpers (tests/test_distributed.py), so the check a GPU owner runs is the one CI keeps working.

- ``amp``: O1 and O2 train (with EMA) + eval + export + resume on one device; losses finite,
  checkpoints float32, a run resumed from epoch 1 ends where the uninterrupted one did, the
  exported model predicts what the trained model predicts.
- ``exact``: N processes x batch B against 1 process x N*B on a deterministic run (no random
  augmentation or dropout, batch-norm statistics frozen, accumulation and freeze-then-unfreeze
  on): the same per-iteration losses, the same weights, and an eval counting every image once.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
LOSS_LINE = re.compile(r"\[Train\]\[Epoch (\d+)/\d+\]\[Iter: (\d+)/\d+\]lr: ([0-9.]+), CELoss: ([0-9.]+)")

_EVAL_OPS = [{"DecodeImage": {"to_rgb": True}}, {"ResizeImage": {"resize_short": 32}},
             {"CropImage": {"size": 32}},
             {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}]
_RANDOM_OPS = [{"DecodeImage": {"to_rgb": True}}, {"RandCropImage": {"size": 32}},
               {"RandFlipImage": {"flip_code": 1}}, _EVAL_OPS[-1]]


_COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30))


def make_data(root, per_class=4):
    """``4 x per_class`` training images (4 colour classes) and a 13-image val list (13: no
    small world size divides it). Colour makes the classes learnable in a few steps, so
    predictions are clear of ties and top-1 comparisons are meaningful. Returns (root, train, val)."""
    import cv2
    root = Path(root)
    rng = np.random.default_rng(3)
    lines = []
    for label, colour in enumerate(_COLOURS):
        (root / "images" / f"c{label}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(colour) + rng.integers(-40, 40, (40, 40, 3)), 0, 255)
            rel = f"images/c{label}/{i}.jpg"
            cv2.imwrite(str(root / rel), img.astype(np.uint8))
            lines.append(f"{rel} {label}")
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    (root / "val_list.txt").write_text("\n".join(lines[:13]) + "\n")
    return root, root / "train_list.txt", root / "val_list.txt"


def config(out, root, train_list, val_list, *, batch, epochs=2, random_aug=False, shuffle=True,
           device="cpu", **extra):
    """Write the deterministic PPLCNet_x0_25 config for ``out``; ``extra`` updates sections."""
    cfg = {
        "Global": {"output_dir": str(out), "device": device, "seed": 7, "epochs": epochs,
                   "save_interval": 1, "print_batch_step": 1, "use_visualdl": True,
                   "image_shape": [3, 32, 32], "update_freq": 2},
        "Arch": {"name": "PPLCNet_x0_25", "class_num": 4, "dropout_prob": 0.0},
        "FineTune": {"freeze_backbone_epochs": 1, "layer_decay": 0.9, "freeze_bn_stats": True},
        "Loss": {"Train": [{"CELoss": {"weight": 1.0, "epsilon": 0.1}}],
                 "Eval": [{"CELoss": {"weight": 1.0}}]},
        "Optimizer": {"name": "Momentum", "momentum": 0.9,
                      "lr": {"name": "Cosine", "learning_rate": 0.5, "warmup_epoch": 0},
                      "regularizer": {"name": "L2", "coeff": 0.0001}},
        "DataLoader": {
            "Train": {"dataset": {"name": "ImageNetDataset", "image_root": str(root),
                                  "cls_label_path": str(train_list),
                                  "transform_ops": _RANDOM_OPS if random_aug else _EVAL_OPS},
                      "sampler": {"name": "DistributedBatchSampler", "batch_size": batch,
                                  "shuffle": shuffle, "drop_last": False},
                      "loader": {"num_workers": 0}},
            "Eval": {"dataset": {"name": "ImageNetDataset", "image_root": str(root),
                                 "cls_label_path": str(val_list), "transform_ops": _EVAL_OPS},
                     "sampler": {"name": "DistributedBatchSampler", "batch_size": 4, "shuffle": False},
                     "loader": {"num_workers": 0}}},
        "Metric": {"Train": [{"TopkAcc": {"topk": [1, 2]}}], "Eval": [{"TopkAcc": {"topk": [1, 2]}}]},
        "Infer": {"infer_imgs": str(root / "images"), "batch_size": 4,
                  "transforms": _EVAL_OPS, "PostProcess": {"name": "Topk", "topk": 2}},
    }
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = Path(str(out) + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write it at once
    tmp.write_text(yaml.safe_dump(cfg))
    os.replace(tmp, path)
    return path


def launch(script_args, log_dir, nproc=2, extra_launch=(), timeout=300, wait=True):
    """``python -m paddle.distributed.launch --nproc_per_node N <script args>``; returns
    ``(returncode, output + worker logs)``, or the running process when ``wait`` is False."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(log_dir), *extra_launch, *map(str, script_args)]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return finish(proc, log_dir, timeout) if wait else proc


def finish(proc, log_dir, timeout=300):
    """Wait for a ``launch(..., wait=False)``; a hang is killed and reported, never waited out."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -9, f"launch did not finish in {timeout}s\n{out[-3000:]}{worker_logs(log_dir)}"
    return proc.returncode, out[-3000:] + worker_logs(log_dir)


def worker_logs(log_dir):
    text = ""
    for path in sorted(Path(log_dir).glob("workerlog.*")):
        text += f"\n----- {path.name}\n" + path.read_text(errors="replace")[-4000:]
    return text


def loss_curve(out_dir):
    """``[(epoch, iteration, lr, CELoss), ...]`` from ``train.log`` (rank 0 logs global means)."""
    log = (Path(out_dir) / "train.log").read_text(encoding="utf-8")
    return [tuple(map(float, m.groups())) for m in LOSS_LINE.finditer(log)]


def compare_runs(one, two):
    """Largest differences between two runs' loss curves, final weights and eval records."""
    from .engine.checkpoint import load_checkpoint
    c1, c2 = np.array(loss_curve(one)), np.array(loss_curve(two))
    a, b = load_checkpoint(Path(one) / "latest")["params"], load_checkpoint(Path(two) / "latest")["params"]
    r1 = json.loads((Path(one) / "train_results.json").read_text())["epochs"]
    r2 = json.loads((Path(two) / "train_results.json").read_text())["epochs"]
    return {"iterations": (len(c1), len(c2)),
            "loss_max_abs_diff": float(np.abs(c1 - c2).max()) if c1.shape == c2.shape else float("inf"),
            "weight_max_abs_diff": max(float(np.abs(a[k] - b[k]).max()) for k in a),
            "eval_top1": ([r["eval_top1"] for r in r1], [r["eval_top1"] for r in r2]),
            "eval_images": ([r["eval_images"] for r in r1], [r["eval_images"] for r in r2])}


def check_exact(workdir, device="cpu", nproc=2, devices=None):
    """N-process batch 2 vs 1-process batch 2N; returns (ok, figures)."""
    from .config import load_config
    from .engine.run import train
    data = make_data(Path(workdir) / "data", per_class=max(4, 2 * nproc))  # 2+ steps per epoch
    many = Path(workdir) / f"exact_{nproc}proc"
    extra = ["--devices", devices] if devices else []
    rc, out = launch(["tools/train.py", "-c", config(many, *data, batch=2, device=device)],
                     Path(workdir) / "exact_log", nproc=nproc, extra_launch=extra)
    if rc != 0:
        return False, {"error": out[-2000:]}
    one = Path(workdir) / "exact_1proc"
    train(load_config(config(one, *data, batch=2 * nproc, device=device)))
    fig = compare_runs(one, many)
    ok = (fig["loss_max_abs_diff"] < 1e-4 and fig["weight_max_abs_diff"] < 1e-4
          and fig["eval_images"][0] == fig["eval_images"][1] == [13, 13]
          and fig["eval_top1"][0] == fig["eval_top1"][1])
    return ok, fig


def check_amp(workdir, device="cpu", level="O1"):
    """Train + eval + export under AMP ``level`` (float16 on a GPU, bfloat16 on the CPU)."""
    from .config import load_config
    from .engine.checkpoint import load_checkpoint
    from .engine.export import export_inference_model
    from .engine.run import evaluate_config, infer, train
    from .predictor import Predictor
    dtype = "float16" if device == "gpu" else "bfloat16"
    data = make_data(Path(workdir) / "data")
    out = Path(workdir) / f"amp_{level}"
    amp = {"use_amp": True, "level": level, "dtype": dtype, "scale_loss": 1024.0,
           "use_dynamic_loss_scaling": True}
    path = config(out, *data, batch=4, device=device, AMP=amp, EMA={"decay": 0.9})
    result = train(load_config(path))
    again = Path(workdir) / f"amp_{level}_resumed"  # resume from epoch 1: the same end
    train(load_config(config(again, *data, batch=4, device=device, AMP=amp, EMA={"decay": 0.9}),
                      [f"Global.checkpoints={out / 'epoch_1'}"]))
    a, b = load_checkpoint(out / "latest"), load_checkpoint(again / "latest")
    resume_diff = max(float(np.abs(a[part][k] - b[part][k]).max())
                      for part in ("params", "ema") for k in a[part])
    best = [f"Global.pretrained_model={out / 'latest'}", f"Global.save_inference_dir={out / 'inference'}"]
    metrics = evaluate_config(load_config(path, best))
    dtypes = {str(v.dtype) for v in load_checkpoint(out / "latest")["params"].values()}
    model_dir = export_inference_model(load_config(path, best))
    dygraph = infer(load_config(path, best))
    served = Predictor(model_dir).predict([r["file_name"] for r in dygraph])
    agree = sum(d["class_ids"][0] == s["class_ids"][0] for d, s in zip(dygraph, served))
    fig = {"final_train_loss": result["history"][-1]["train_loss"],
           "eval_top1_in_training": result["history"][-1]["eval_top1"],
           "eval_top1_reloaded": metrics["top1"], "checkpoint_dtypes": sorted(dtypes),
           "export_top1_agreement": f"{agree}/{len(dygraph)}", "resume_max_abs_diff": resume_diff}
    ok = (np.isfinite(fig["final_train_loss"]) and dtypes <= {"float32", "int64", "int32"}
          and resume_diff < 1e-4
          and abs(metrics["top1"] - fig["eval_top1_in_training"]) < 1e-9 and agree == len(dygraph))
    return ok, fig
