"""Shared by the multi-process tests: a tiny dataset, a deterministic config, a launcher."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_tiny_dataset  # noqa: E402

EVAL_OPS = [{"DecodeImage": {"to_rgb": True}}, {"ResizeImage": {"resize_short": 32}},
            {"CropImage": {"size": 32}},
            {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}]
RANDOM_OPS = [{"DecodeImage": {"to_rgb": True}}, {"RandCropImage": {"size": 32}},
              {"RandFlipImage": {"flip_code": 1}}, EVAL_OPS[-1]]


def make_data(root):
    """16 training images (4 classes) and a 13-image val list: 13 is not divisible by 2."""
    root, train_list, _ = write_tiny_dataset(root, classes=4, per_class=4)
    lines = train_list.read_text().splitlines()
    val = root / "val_list.txt"
    val.write_text("\n".join(lines[:13]) + "\n")
    return root, train_list, val


def config(out, root, train_list, val_list, *, batch, epochs=2, random_aug=False, shuffle=True,
           **extra):
    """A deterministic PPLCNet_x0_25 run: augmentation and dropout off, batch norm statistics
    frozen, so N processes x batch B compute exactly what 1 process x N*B computes."""
    ops = RANDOM_OPS if random_aug else EVAL_OPS
    cfg = {
        "Global": {"output_dir": str(out), "device": "cpu", "seed": 7, "epochs": epochs,
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
                                  "cls_label_path": str(train_list), "transform_ops": ops},
                      "sampler": {"name": "DistributedBatchSampler", "batch_size": batch,
                                  "shuffle": shuffle, "drop_last": False},
                      "loader": {"num_workers": 0}},
            "Eval": {"dataset": {"name": "ImageNetDataset", "image_root": str(root),
                                 "cls_label_path": str(val_list), "transform_ops": EVAL_OPS},
                     "sampler": {"name": "DistributedBatchSampler", "batch_size": 4, "shuffle": False},
                     "loader": {"num_workers": 0}}},
        "Metric": {"Train": [{"TopkAcc": {"topk": [1, 2]}}], "Eval": [{"TopkAcc": {"topk": [1, 2]}}]},
    }
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    path = Path(out).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(script_args, log_dir, nproc=2, extra_launch=(), timeout=240, wait=True):
    """``python -m paddle.distributed.launch --nproc_per_node N <script args>`` on the CPU."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(log_dir), *extra_launch, *map(str, script_args)]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    return finish(proc, log_dir, timeout)


def finish(proc, log_dir, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang is a failure, never a stuck suite
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"launch did not finish in {timeout}s:\n{out[-3000:]}\n{worker_logs(log_dir)}")
    return proc.returncode, out + worker_logs(log_dir)


def worker_logs(log_dir):
    text = ""
    for path in sorted(Path(log_dir).glob("workerlog.*")):
        text += f"\n----- {path.name}\n" + path.read_text(errors="replace")[-4000:]
    return text
