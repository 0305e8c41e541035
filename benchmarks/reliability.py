"""The reliability table in docs/reliability.md: bad inputs and faults, and what each produces.

Every case runs the real command line (``tools/*.py``, ``deploy/python/predict_cls.py``) in a
subprocess on a tiny generated dataset (3 classes of 40x48 JPEGs, PPLCNet_x0_25 at 32 px, one
epoch: a couple of seconds), in a folder of its own. Cases that need earlier outputs get a copy of
one finished run (``latest``, ``best_model``, ``epoch_1``) in ``Global.output_dir``, and so does
every other training case; afterwards every checkpoint of that copy must still load, and for a
case that is meant to fail, be byte-identical.

Columns: the exit code, the first line of stderr (or, for a run that is meant to warn, the first
warning it logged), whether earlier outputs survived, and the verdict:

- ``silent``: meant to fail, but exited 0; or meant to warn, but printed no warning;
- ``data lost``: an earlier checkpoint no longer loads, or changed although the case failed;
- ``traceback``: a raw Python traceback reached the user;
- ``unclear``: failed without the one ``error: ...`` line, or without naming what to change.

Cases that need root (tmpfs, read-only remounts) are listed as skipped elsewhere.

    python benchmarks/reliability.py                         # all cases -> docs/reliability.md
    python benchmarks/reliability.py --only lock sigterm --out /tmp/r.md --jobs 1
"""
import argparse
import datetime
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRAIN, EVAL, INFER, EXPORT = (str(REPO / "tools" / f"{n}.py") for n in ("train", "eval", "infer", "export_model"))
DEPLOY = str(REPO / "deploy" / "python" / "predict_cls.py")
DEPLOY_CFG = str(REPO / "deploy" / "configs" / "inference_cls.yaml")
TIMEOUT = 300  # seconds per case; a hang is reported as such
CHECKPOINTS = ("latest", "best_model", "epoch_1")
SUFFIXES = (".pdparams", ".pdopt", ".pdstates")

NORMALIZE = {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}


def base_config(root, out):
    """The tiny training config every case starts from (a plain dict, dumped per case)."""
    def dataset(ops):
        return {"name": "ImageNetDataset", "image_root": str(root), "cls_label_path": str(root / "train_list.txt"),
                "transform_ops": [{"DecodeImage": {"to_rgb": True}}] + ops + [NORMALIZE]}
    eval_ops = [{"ResizeImage": {"resize_short": 32}}, {"CropImage": {"size": 32}}]
    return {
        "Global": {"output_dir": str(out), "device": "cpu", "seed": 3, "epochs": 1, "save_interval": 1,
                   "print_batch_step": 1, "use_visualdl": False, "image_shape": [3, 32, 32]},
        "Arch": {"name": "PPLCNet_x0_25", "class_num": 3},
        "Loss": {"Train": [{"CELoss": {"weight": 1.0, "epsilon": 0.1}}], "Eval": [{"CELoss": {"weight": 1.0}}]},
        "Optimizer": {"name": "Momentum", "momentum": 0.9,
                      "lr": {"name": "Cosine", "learning_rate": 0.05, "warmup_epoch": 0},
                      "regularizer": {"name": "L2", "coeff": 0.0001}},
        "DataLoader": {
            "Train": {"dataset": dataset([{"RandCropImage": {"size": 32}}, {"RandFlipImage": {"flip_code": 1}}]),
                      "sampler": {"name": "DistributedBatchSampler", "batch_size": 4, "shuffle": True,
                                  "drop_last": False},
                      "loader": {"num_workers": 0}},
            "Eval": {"dataset": dataset(eval_ops),
                     "sampler": {"name": "DistributedBatchSampler", "batch_size": 8, "shuffle": False},
                     "loader": {"num_workers": 0}}},
        "Metric": {"Train": [{"TopkAcc": {"topk": [1, 2]}}], "Eval": [{"TopkAcc": {"topk": [1, 2]}}]},
        "Infer": {"infer_imgs": str(root / "images"), "batch_size": 5,
                  "transforms": [{"DecodeImage": {"to_rgb": True}}] + eval_ops + [NORMALIZE, {"ToCHWImage": None}],
                  "PostProcess": {"name": "Topk", "topk": 2, "class_id_map_file": str(root / "label_list.txt")}},
    }


def write_dataset(root, classes=3, per_class=4):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for c in range(classes):
        (root / "images" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((40, 48, 3), np.uint8)
            img[..., c % 3] = 200
            img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / "images" / f"c{c}" / f"{i}.jpg"), img)
            lines.append(f"images/c{c}/{i}.jpg {c}")
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    (root / "label_list.txt").write_text("".join(f"{c} class{c}\n" for c in range(classes)))


def bomb_png(path, side=30000):
    """One colour, ``side`` x ``side``: under 1 MB as PNG, 2.7 GB decoded as RGB."""
    import cv2
    import numpy as np
    path.write_bytes(cv2.imencode(".png", np.zeros((side, side), np.uint8))[1].tobytes())


# ----------------------------------------------------------------------------- workspace
class Workspace:
    """One case's folder: its config, its output folder, optionally its own copy of the data."""

    def __init__(self, root, base):
        self.root = root
        self.base = base          # the shared Base (dataset, finished run, exported model)
        self.data = base.data
        self.out = root / "out"
        self.cfg = base_config(self.data, self.out)
        self.mounts = []

    def own_data(self):
        """Copy the dataset into this case's folder (for cases that damage it)."""
        self.data = self.root / "data"
        shutil.copytree(self.base.data, self.data)
        self.cfg = base_config(self.data, self.out)
        return self.data

    def prior_run(self):
        """Put a copy of a finished one-epoch run into ``out``."""
        shutil.copytree(self.base.run, self.out)

    def prior_run_into_mount(self):
        """The same, into an ``out`` that exists already (a mount point)."""
        for p in self.base.run.iterdir():
            shutil.copy2(p, self.out / p.name)

    def cfg_path(self, text=None):
        path = self.root / "config.yaml"
        if text is None:
            text = yaml.safe_dump(self.cfg, sort_keys=False, allow_unicode=True)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def tool(self, script, *overrides, config=None):
        return [sys.executable, script, "-c", config or self.cfg_path(),
                *[a for o in overrides for a in ("-o", o)]]

    def mount_tmpfs(self, folder, size="8m"):
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise Skip(f"mount tmpfs not permitted ({done.stderr.strip() or 'needs root'})")
        self.mounts.append(folder)

    def remount(self, folder, options):
        done = subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            raise Skip(f"remount {options} not permitted ({done.stderr.strip()})")

    def cleanup(self):
        for m in self.mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)


class Skip(Exception):
    """The case cannot be run here (e.g. mount is not permitted); the reason is shown."""


@dataclass
class Job:
    argv: list
    preexec: object = None
    drive: object = None      # drive(proc, ws) -> None: signals a running process, waits for it
    check: object = None      # check(ws, stdout, stderr) -> problem text or None
    cwd: str = None


@dataclass
class Case:
    name: str
    group: str
    what: str
    expect: str               # "error": exit != 0 with one line; "warn": exit 0 + warning; "ok"
    build: object             # build(ws) -> Job
    prior: bool = False       # out/ holds a finished run whose checkpoints must survive
    needle: str = ""          # what the message must name (a key, a file) to count as clear


CASES = []


def case(group, expect, what, prior=False, needle=""):
    def register(fn):
        CASES.append(Case(fn.__name__, group, what, expect, fn, prior, needle))
        return fn
    return register


def set_key(cfg, dotted, value):
    node = cfg
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for p in parts[:-1]:
        node = node[p]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


DELETE = object()


def edited(ws, *changes):
    for dotted, value in changes:
        set_key(ws.cfg, dotted, value)
    return ws.tool(TRAIN)


# ------------------------------------------------------------------------------ cases: config
@case("config", "error", "unknown Global key (`-o Global.epoch=3`)", needle="Global.epoch")
def unknown_global_key(ws):
    return Job(ws.tool(TRAIN, "Global.epoch=3"))


@case("config", "error", "unknown Arch key (`Arch.num_classes`, timm's spelling)", needle="Arch.num_classes")
def unknown_arch_key(ws):
    return Job(edited(ws, ("Arch.num_classes", 3)))


@case("config", "error", "misspelled model name (`ResNet5O`)", needle="ResNet50")
def misspelled_model(ws):
    return Job(ws.tool(TRAIN, "Arch.name=ResNet5O"))


@case("config", "error", "wrong type: `Global.epochs=abc`", needle="Global.epochs")
def epochs_not_a_number(ws):
    return Job(ws.tool(TRAIN, "Global.epochs=abc"))


@case("config", "error", "wrong type: `Optimizer.momentum=fast`", needle="momentum")
def momentum_not_a_number(ws):
    return Job(ws.tool(TRAIN, "Optimizer.momentum=fast"))


@case("config", "error", "missing section: no `Optimizer`", needle="Optimizer")
def missing_optimizer(ws):
    return Job(edited(ws, ("Optimizer", DELETE)))


@case("config", "error", "missing section: no `Loss`", needle="Loss")
def missing_loss(ws):
    return Job(edited(ws, ("Loss", DELETE)))


@case("config", "error", "missing section: no `DataLoader.Train`", needle="DataLoader.Train")
def missing_train_loader(ws):
    return Job(edited(ws, ("DataLoader.Train", DELETE)))


@case("config", "error", "missing `Arch.class_num`", needle="Arch.class_num")
def missing_class_num(ws):
    return Job(edited(ws, ("Arch.class_num", DELETE)))


@case("config", "error", "bad `-o` syntax: `-o Global.epochs` (no `=`)", needle="Global.epochs")
def override_without_equals(ws):
    return Job(ws.tool(TRAIN, "Global.epochs"))


@case("config", "error", "`-o` into a list index that does not exist", needle="transform_ops")
def override_bad_index(ws):
    return Job(ws.tool(TRAIN, "DataLoader.Train.dataset.transform_ops.9.RandCropImage.size=16"))


@case("config", "error", "`-o` value that is not valid YAML (`Global.epochs=[1`)", needle="Global.epochs")
def override_bad_yaml(ws):
    return Job(ws.tool(TRAIN, "Global.epochs=[1"))


@case("config", "error", "config file is not valid YAML", needle="config.yaml")
def invalid_yaml(ws):
    return Job(ws.tool(TRAIN, config=ws.cfg_path("Global:\n  epochs: 1\n   seed: [1, 2\n")))


@case("config", "error", "config file does not exist", needle="missing.yaml")
def config_missing(ws):
    return Job([sys.executable, TRAIN, "-c", str(ws.root / "missing.yaml")])


@case("config", "error", "config is a YAML list, not a mapping", needle="config.yaml")
def config_is_a_list(ws):
    return Job(ws.tool(TRAIN, config=ws.cfg_path("- Global\n- Arch\n")))


@case("config", "error", "no `-c` argument at all", needle="-c")
def no_config_argument(ws):
    return Job([sys.executable, TRAIN])


@case("config", "error", "unknown transform name (`RandCropImg`)", needle="RandCropImage")
def unknown_transform(ws):
    return Job(edited(ws, ("DataLoader.Train.dataset.transform_ops.1", {"RandCropImg": {"size": 32}})))


@case("config", "error", "unknown transform key (`RandCropImage.sizee`)", needle="sizee")
def unknown_transform_key(ws):
    return Job(edited(ws, ("DataLoader.Train.dataset.transform_ops.1", {"RandCropImage": {"sizee": 32}})))


@case("config", "error", "unknown LR schedule (`Cosin`)", needle="Cosine")
def unknown_lr_schedule(ws):
    return Job(ws.tool(TRAIN, "Optimizer.lr.name=Cosin"))


@case("config", "error", "unknown optimizer (`Adamw`)", needle="AdamW")
def unknown_optimizer(ws):
    return Job(ws.tool(TRAIN, "Optimizer.name=Adamw"))


@case("config", "error", "unknown loss (`CELos`)", needle="CELoss")
def unknown_loss(ws):
    return Job(edited(ws, ("Loss.Train", [{"CELos": {"weight": 1.0}}])))


@case("config", "error", "negative learning rate", needle="learning_rate")
def negative_lr(ws):
    return Job(ws.tool(TRAIN, "Optimizer.lr.learning_rate=-0.1"))


@case("config", "error", "`batch_size: 0`", needle="batch_size")
def batch_size_zero(ws):
    return Job(ws.tool(TRAIN, "DataLoader.Train.sampler.batch_size=0"))


@case("config", "error", "`warmup_epoch` >= `epochs`", needle="warmup_epoch")
def warmup_too_long(ws):
    return Job(ws.tool(TRAIN, "Optimizer.lr.warmup_epoch=1"))


@case("config", "error", "`Global.update_freq: 0`", needle="update_freq")
def update_freq_zero(ws):
    return Job(ws.tool(TRAIN, "Global.update_freq=0"))


@case("config", "error", "`Global.epochs: 0`", needle="Global.epochs")
def zero_epochs(ws):
    return Job(ws.tool(TRAIN, "Global.epochs=0"))


@case("config", "ok", "config saved with a UTF-8 BOM and CRLF line ends (Windows Notepad)")
def config_bom_crlf(ws):
    text = yaml.safe_dump(ws.cfg, sort_keys=False).replace("\n", "\r\n")
    path = ws.root / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return Job([sys.executable, TRAIN, "-c", str(path)])


@case("config", "ok", "`save_interval: 0`: no `epoch_N` files (PaddleClas behaviour)")
def save_interval_zero(ws):
    def check(ws, out, err):
        extra = sorted(p.name for p in ws.out.glob("epoch_*"))
        missing = [n for n in ("latest.pdparams", "best_model.pdparams") if not (ws.out / n).is_file()]
        return (f"unexpected {extra}" if extra else None) or (f"missing {missing}" if missing else None)
    ws.out.mkdir()  # empty: no earlier epoch_1 to confuse the check
    return Job(ws.tool(TRAIN, "Global.save_interval=0"), check=check)


# -------------------------------------------------------------------------------- cases: data
@case("data", "error", "`cls_label_path` does not exist", needle="no_such_list.txt")
def list_missing(ws):
    return Job(ws.tool(TRAIN, f"DataLoader.Train.dataset.cls_label_path={ws.root / 'no_such_list.txt'}"))


@case("data", "error", "`image_root` does not exist", needle="image_root")
def image_root_missing(ws):
    return Job(ws.tool(TRAIN, f"DataLoader.Train.dataset.image_root={ws.root / 'nowhere'}"))


def damaged_list(ws, transform):
    data = ws.own_data()
    lst = data / "train_list.txt"
    lst.write_bytes(transform(lst.read_bytes()))
    return Job(ws.tool(TRAIN))


@case("data", "error", "empty list file", needle="train_list.txt")
def empty_list(ws):
    return damaged_list(ws, lambda b: b"")


@case("data", "error", "list line without a label", needle="train_list.txt:3")
def line_without_label(ws):
    return damaged_list(ws, lambda b: b.replace(b"images/c0/2.jpg 0", b"images/c0/2.jpg"))


@case("data", "error", "label that is not an integer (`zero`)", needle="train_list.txt:2")
def label_not_integer(ws):
    return damaged_list(ws, lambda b: b.replace(b"images/c0/1.jpg 0", b"images/c0/1.jpg zero"))


@case("data", "error", "label >= `Arch.class_num`", needle="train_list.txt:1")
def label_out_of_range(ws):
    return damaged_list(ws, lambda b: b.replace(b"images/c0/0.jpg 0", b"images/c0/0.jpg 7"))


@case("data", "error", "negative label", needle="train_list.txt:1")
def label_negative(ws):
    return damaged_list(ws, lambda b: b.replace(b"images/c0/0.jpg 0", b"images/c0/0.jpg -1"))


@case("data", "error", "listed image does not exist", needle="gone.jpg")
def image_missing(ws):
    return damaged_list(ws, lambda b: b.replace(b"images/c0/0.jpg", b"images/c0/gone.jpg"))


@case("data", "error", "list in GBK, not UTF-8 (Chinese Windows)", needle="UTF-8")
def list_in_gbk(ws):
    return damaged_list(ws, lambda b: b.replace(b"images/c0/0.jpg", "images/c0/玫瑰.jpg".encode("gbk")))


@case("data", "warn", "corrupt image (random bytes named .jpg): skipped", needle="0.jpg")
def corrupt_image(ws):
    data = ws.own_data()
    (data / "images" / "c0" / "0.jpg").write_bytes(os.urandom(3000))
    return Job(ws.tool(TRAIN))


@case("data", "warn", "zero-byte image: skipped", needle="1.jpg")
def empty_image(ws):
    data = ws.own_data()
    (data / "images" / "c0" / "1.jpg").write_bytes(b"")
    return Job(ws.tool(TRAIN))


@case("data", "warn", "truncated JPEG (first 300 bytes)", needle="2.jpg")
def truncated_image(ws):
    data = ws.own_data()
    path = data / "images" / "c1" / "2.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return Job(ws.tool(TRAIN))


@case("data", "error", "every image unreadable", needle="unreadable")
def all_images_corrupt(ws):
    data = ws.own_data()
    for p in (data / "images").rglob("*.jpg"):
        p.write_bytes(b"not an image")
    return Job(ws.tool(TRAIN))


@case("data", "warn", "decompression bomb (30000x30000 PNG, 0.9 MB): skipped, memory untouched",
      needle="max_pixels")
def decompression_bomb(ws):
    data = ws.own_data()
    bomb_png(data / "images" / "c0" / "bomb.png")
    with open(data / "train_list.txt", "a") as f:
        f.write("images/c0/bomb.png 0\n")
    return Job(ws.tool(TRAIN), preexec=lambda: _limit_memory(1 << 31))


def _limit_memory(nbytes):
    """In the child: a data segment limit, so decoding the bomb (2.7 GB) would fail loudly."""
    import resource
    resource.setrlimit(resource.RLIMIT_DATA, (nbytes, nbytes))


@case("data", "ok", "list with a UTF-8 BOM and CRLF line ends")
def list_bom_crlf(ws):
    return damaged_list(ws, lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n"))


@case("data", "ok", "Chinese folder and file names in `image_root` and the list")
def chinese_names(ws):
    data = ws.own_data()
    target = ws.root / "花卉 数据"
    data.rename(target)
    for c in range(3):
        folder = target / "images" / f"c{c}"
        for p in folder.glob("*.jpg"):
            p.rename(folder / f"图片_{p.stem}.jpg")
        folder.rename(target / "images" / f"类别{c}")
    lst = target / "train_list.txt"
    text = lst.read_text()
    for c in range(3):
        text = text.replace(f"images/c{c}/", f"images/类别{c}/图片_")
    lst.write_text(text, encoding="utf-8")
    ws.data = target
    ws.cfg = base_config(target, ws.out)
    return Job(ws.tool(TRAIN))


@case("data", "ok", "grayscale and RGBA PNGs among the JPEGs")
def gray_and_rgba(ws):
    import cv2
    import numpy as np
    data = ws.own_data()
    cv2.imwrite(str(data / "images" / "c0" / "gray.png"), np.full((40, 48), 90, np.uint8))
    cv2.imwrite(str(data / "images" / "c1" / "rgba.png"), np.full((40, 48, 4), 90, np.uint8))
    with open(data / "train_list.txt", "a") as f:
        f.write("images/c0/gray.png 0\nimages/c1/rgba.png 1\n")

    def check(ws, out, err):
        return None if "skipped: 0 images" in out else "images were skipped"
    return Job(ws.tool(TRAIN), check=check)


# ----------------------------------------------------------------------------- cases: weights
@case("weights", "error", "`Global.pretrained_model` file does not exist", needle="Global.pretrained_model")
def pretrained_missing(ws):
    return Job(ws.tool(TRAIN, f"Global.pretrained_model={ws.root / 'none'}"))


@case("weights", "error", "`pretrained_model` is not a weights file (random bytes)", needle="junk.pdparams")
def pretrained_junk(ws):
    (ws.root / "junk.pdparams").write_bytes(os.urandom(5000))
    return Job(ws.tool(TRAIN, f"Global.pretrained_model={ws.root / 'junk.pdparams'}"))


@case("weights", "error", "weights of another architecture (ResNet18 for PPLCNet)", needle="other.pdparams")
def pretrained_other_arch(ws):
    return Job(ws.tool(TRAIN, f"Global.pretrained_model={ws.base.resnet18}"))


@case("weights", "ok", "fine-tune from weights with another class count (the log says: head re-initialised)",
      needle="head re-initialised for 5 classes")
def pretrained_other_class_count(ws):
    return Job(ws.tool(TRAIN, f"Global.pretrained_model={ws.base.run / 'best_model'}", "Arch.class_num=5"))


@case("weights", "error", "`Global.checkpoints` does not exist", needle="Global.checkpoints")
def resume_missing(ws):
    return Job(ws.tool(TRAIN, f"Global.checkpoints={ws.root / 'nothing' / 'latest'}"))


@case("weights", "error", "resume a checkpoint of another model", needle="Arch", prior=True)
def resume_other_model(ws):
    ws.prior_run()
    return Job(ws.tool(TRAIN, f"Global.checkpoints={ws.out / 'latest'}", "Arch.name=PPLCNet_x0_5",
                       "Global.epochs=2"))


@case("weights", "error", "resume from a truncated `.pdparams` (copy cut off)", needle="cut.pdparams")
def resume_truncated(ws):
    for s in SUFFIXES:
        shutil.copy(ws.base.run / f"latest{s}", ws.root / f"cut{s}")
    path = ws.root / "cut.pdparams"
    path.write_bytes(path.read_bytes()[:20000])
    return Job(ws.tool(TRAIN, f"Global.checkpoints={ws.root / 'cut'}", "Global.epochs=2"))


@case("weights", "error", "resume from weights only (no `.pdopt`/`.pdstates`)", needle="pretrained_model")
def resume_weights_only(ws):
    shutil.copy(ws.base.run / "latest.pdparams", ws.root / "w.pdparams")
    return Job(ws.tool(TRAIN, f"Global.checkpoints={ws.root / 'w'}", "Global.epochs=2"))


@case("weights", "ok", "`Global.auto_resume: True` after a finished epoch", prior=True)
def auto_resume(ws):
    ws.prior_run()

    def check(ws, out, err):
        return None if "resumed from" in out and "[Train][Epoch 2/2]" in out else "did not resume"
    return Job(ws.tool(TRAIN, "Global.auto_resume=True", "Global.epochs=2"), check=check)


# ------------------------------------------------------------------------- cases: filesystem
@case("filesystem", "error", "`output_dir` below a regular file", needle="is a regular file")
def output_below_file(ws):
    (ws.root / "blocker").write_text("a file\n")
    return Job(ws.tool(TRAIN, f"Global.output_dir={ws.root / 'blocker' / 'out'}"))


@case("filesystem", "error", "`output_dir` on a read-only filesystem (cannot be created)",
      needle="Global.output_dir")
def output_read_only(ws):
    ws.mount_tmpfs(ws.root / "ro")
    ws.remount(ws.root / "ro", "ro")
    return Job(ws.tool(TRAIN, f"Global.output_dir={ws.root / 'ro' / 'out'}"))


@case("filesystem", "error", "earlier run's folder remounted read-only, then resumed",
      needle="Read-only", prior=True)
def resume_into_read_only(ws):
    ws.mount_tmpfs(ws.out)
    ws.prior_run_into_mount()
    ws.remount(ws.out, "ro")
    return Job(ws.tool(TRAIN, "Global.auto_resume=True", "Global.epochs=2"))


@case("filesystem", "error", "disk full (ENOSPC) during a checkpoint save", needle="No space left",
      prior=True)
def disk_full(ws):
    ws.mount_tmpfs(ws.out)
    ws.prior_run_into_mount()
    st = os.statvfs(ws.out)
    with open(ws.out / "filler", "wb") as f:  # leave ~50 kB: the log fits, a checkpoint does not
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 50_000))
    return Job(ws.tool(TRAIN, "Global.auto_resume=True", "Global.epochs=2"))


@case("filesystem", "error", "file too large (EFBIG, RLIMIT_FSIZE) during a save", needle="File too large",
      prior=True)
def file_too_large(ws):
    ws.prior_run()

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    return Job(ws.tool(TRAIN, "Global.auto_resume=True", "Global.epochs=2"), preexec=limit)


@case("filesystem", "error", "a second run into the `output_dir` of a running one", needle="pid")
def double_run(ws):
    ws.cfg = base_config(ws.base.long_data, ws.out)
    ws.cfg["Global"]["epochs"] = 40
    first_argv = ws.tool(TRAIN)

    def drive(proc, ws):
        first = subprocess.Popen(first_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
        try:
            _wait_for(first, "[Iter: 2/")
            proc.start()
            proc.wait()
            if first.poll() is not None:
                proc.problem = "the first run died"
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    return Job(ws.tool(TRAIN), drive=drive)


# ---------------------------------------------------------------------------- cases: signals
def _wait_for(proc, needle, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ended before printing {needle!r}")
        if needle in line:
            return
    raise RuntimeError(f"{needle!r} not printed within {timeout} s")


def _signal_mid_epoch(ws, signum):
    ws.cfg = base_config(ws.base.long_data, ws.out)
    ws.cfg["Global"]["epochs"] = 40

    def drive(proc, ws):
        proc.start()
        _wait_for(proc.popen, "[Train][Epoch 2/40][Iter: 3/")
        proc.snapshot = snapshot(ws.out)  # epoch 1's checkpoints: must survive untouched
        os.killpg(proc.popen.pid, signum)
        proc.wait()

    def check(ws, out, err):
        return None if "Global.auto_resume=True" in out else "no resume hint in the log"
    return Job(ws.tool(TRAIN), drive=drive, check=check)


@case("signals", "error", "SIGTERM mid-epoch (scheduler preemption), to the process group",
      needle="stopped by SIGTERM", prior=True)
def sigterm(ws):
    return _signal_mid_epoch(ws, signal.SIGTERM)


@case("signals", "error", "Ctrl-C (SIGINT) mid-epoch", needle="stopped by SIGINT", prior=True)
def sigint(ws):
    return _signal_mid_epoch(ws, signal.SIGINT)


@case("signals", "ok", "SIGKILL mid-epoch, then `auto_resume`: continues from `latest`",
      needle="resumed from", prior=True)
def sigkill_then_resume(ws):
    ws.cfg = base_config(ws.base.long_data, ws.out)
    ws.cfg["Global"]["epochs"] = 40
    killed = ws.tool(TRAIN)

    def drive(proc, ws):
        first = subprocess.Popen(killed, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
        _wait_for(first, "[Train][Epoch 2/40][Iter: 3/")
        proc.snapshot = snapshot(ws.out)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        proc.start()
        proc.wait()
    return Job(ws.tool(TRAIN, "Global.auto_resume=True", "Global.epochs=2"), drive=drive)


# ------------------------------------------------------------------------------ cases: tools
@case("tools", "error", "eval without weights", needle="Global.pretrained_model")
def eval_without_weights(ws):
    return Job(ws.tool(EVAL))


@case("tools", "error", "eval without a `DataLoader.Eval` section", needle="DataLoader.Eval")
def eval_without_loader(ws):
    set_key(ws.cfg, "DataLoader.Eval", DELETE)
    return Job(ws.tool(EVAL, f"Global.pretrained_model={ws.base.run / 'best_model'}"))


@case("tools", "error", "eval weights trained for another class count", needle="Arch.class_num")
def eval_class_mismatch(ws):
    return Job(ws.tool(EVAL, f"Global.pretrained_model={ws.base.run / 'best_model'}", "Arch.class_num=5"))


@case("tools", "error", "infer on a path that does not exist", needle="Infer.infer_imgs")
def infer_missing_images(ws):
    return Job(ws.tool(INFER, f"Global.pretrained_model={ws.base.run / 'best_model'}",
                       f"Infer.infer_imgs={ws.root / 'none.jpg'}"))


@case("tools", "error", "infer without weights", needle="pretrained_model")
def infer_without_weights(ws):
    return Job(ws.tool(INFER))


@case("tools", "error", "infer on a corrupt image", needle="bad.jpg")
def infer_corrupt(ws):
    (ws.root / "bad.jpg").write_bytes(os.urandom(2000))
    return Job(ws.tool(INFER, f"Global.pretrained_model={ws.base.run / 'best_model'}",
                       f"Infer.infer_imgs={ws.root / 'bad.jpg'}"))


@case("tools", "error", "infer on a decompression bomb", needle="bomb.png")
def infer_bomb(ws):
    bomb_png(ws.root / "bomb.png")
    return Job(ws.tool(INFER, f"Global.pretrained_model={ws.base.run / 'best_model'}",
                       f"Infer.infer_imgs={ws.root / 'bomb.png'}"), preexec=lambda: _limit_memory(1 << 31))


@case("tools", "ok", "infer with a BOM in `class_id_map_file`")
def infer_label_bom(ws):
    labels = ws.root / "labels.txt"
    labels.write_bytes(b"\xef\xbb\xbf" + (ws.data / "label_list.txt").read_bytes())

    def check(ws, out, err):
        return None if "label_name(s): ['class" in out else "no label names printed"
    return Job(ws.tool(INFER, f"Global.pretrained_model={ws.base.run / 'best_model'}",
                       f"Infer.PostProcess.class_id_map_file={labels}"), check=check)


@case("tools", "error", "export without weights", needle="--allow-random")
def export_without_weights(ws):
    return Job(ws.tool(EXPORT))


@case("tools", "error", "export with a weights file that does not exist", needle="Global.pretrained_model")
def export_missing_weights(ws):
    return Job(ws.tool(EXPORT, f"Global.pretrained_model={ws.root / 'none'}"))


@case("tools", "error", "export into a folder below a regular file", needle="Global.save_inference_dir")
def export_below_file(ws):
    (ws.root / "blocker").write_text("x")
    return Job(ws.tool(EXPORT, f"Global.pretrained_model={ws.base.run / 'best_model'}",
                       f"Global.save_inference_dir={ws.root / 'blocker' / 'inference'}"))


@case("tools", "error", "deploy with a model folder that does not exist", needle="Global.inference_model_dir")
def deploy_missing_model(ws):
    return Job([sys.executable, DEPLOY, "-c", DEPLOY_CFG, "-o", f"Global.inference_model_dir={ws.root / 'none'}",
                "-o", f"Global.infer_imgs={ws.data / 'images'}"])


@case("tools", "error", "deploy on a corrupt image", needle="bad.jpg")
def deploy_corrupt_image(ws):
    (ws.root / "bad.jpg").write_bytes(os.urandom(2000))
    return Job([sys.executable, DEPLOY, "-c", DEPLOY_CFG, "-o", f"Global.inference_model_dir={ws.base.inference}",
                "-o", f"Global.infer_imgs={ws.root / 'bad.jpg'}", "-o", "Global.enable_mkldnn=False"])


@case("tools", "error", "deploy with an unknown `-o` key", needle="Global.use_gpus")
def deploy_unknown_key(ws):
    return Job([sys.executable, DEPLOY, "-c", DEPLOY_CFG, "-o", "Global.use_gpus=True"])


@case("tools", "ok", "deploy on an exported model and a folder of images")
def deploy_ok(ws):
    def check(ws, out, err):
        return None if out.count("class id(s):") == 12 else "not 12 predictions"
    return Job([sys.executable, DEPLOY, "-c", DEPLOY_CFG, "-o", f"Global.inference_model_dir={ws.base.inference}",
                "-o", f"Global.infer_imgs={ws.data / 'images'}", "-o", "Global.enable_mkldnn=False"], check=check)


# ------------------------------------------------------------------------------ running
def snapshot(folder):
    """sha256 of every checkpoint file in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).glob("*")) if p.suffix in SUFFIXES}


class Proc:
    """A case's subprocess; ``drive`` functions start and wait for it themselves."""

    def __init__(self, job):
        self.job, self.popen, self.problem, self.snapshot = job, None, None, None
        self.stdout = self.stderr = ""

    def start(self):
        self.popen = subprocess.Popen(self.job.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      preexec_fn=self.job.preexec, start_new_session=True, cwd=self.job.cwd,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait(self):
        try:
            out, err = self.popen.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            out, err = self.popen.communicate()
            self.problem = f"hung (killed after {TIMEOUT} s)"
        self.stdout += out
        self.stderr += err


@dataclass
class Result:
    case: Case
    code: object = None
    message: str = ""
    earlier: str = "n/a"
    flags: list = field(default_factory=list)
    skipped: str = ""


def first_message(case, out, err):
    """The first stderr line; for a case meant to warn, or a quiet stderr, the first warning or
    error the run logged instead (for a case that should work, the line holding its needle)."""
    errs = [line for line in err.splitlines() if line.strip()]
    logged = [re.sub(r"^\[[^\]]*\] ", "", line) for line in out.splitlines()
              if " WARNING " in line or " ERROR " in line or line.startswith("warning:")]
    if errs and case.expect != "warn":
        return errs[0]
    if case.expect == "ok" and case.needle:  # what shows that it worked (e.g. the head reset)
        logged = [re.sub(r"^\[[^\]]*\] ", "", line) for line in out.splitlines() if case.needle in line]
    return (logged or errs or [""])[0]


def judge(case, proc, ws, before, prior=False):
    res = Result(case, proc.popen.returncode if proc.popen else None)
    out, err = proc.stdout, proc.stderr
    res.message = first_message(case, out, err)
    text = out + err
    if "Traceback (most recent call last)" in text:
        res.flags.append("traceback")
    if proc.problem:
        res.flags.append(proc.problem)
    code = res.code
    if case.expect == "error":
        if code == 0:
            res.flags.append("silent")
        elif not (err.strip().startswith("error:") or "stopped by" in text or "usage:" in err):
            res.flags.append("unclear")
    elif code != 0:
        res.flags.append(f"failed (exit {code})")
    if case.expect == "warn" and not re.search(r" WARNING |^warning:", out, re.M):
        res.flags.append("silent")
    if case.needle and case.needle not in text:
        res.flags.append(f"unclear: does not name {case.needle!r}")
    if proc.job.check is not None:
        problem = proc.job.check(ws, out, err)
        if problem:
            res.flags.append(problem)
    if prior:
        res.earlier = earlier_outputs(case, ws, before if proc.snapshot is None else proc.snapshot, code)
        if res.earlier.startswith("LOST"):
            res.flags.append("data lost")
    return res


def earlier_outputs(case, ws, before, code):
    from ppcls_ft.engine.checkpoint import load_checkpoint
    broken = []
    for name in {n.rsplit(".", 1)[0] for n in before}:
        try:
            load_checkpoint(ws.out / name)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            broken.append(f"{name} ({type(exc).__name__})")
    if broken:
        return "LOST: " + ", ".join(sorted(broken))
    after = snapshot(ws.out)
    changed = sorted(n for n, h in before.items() if after.get(n) != h)
    if changed and code != 0 and case.expect == "error":
        return "LOST: changed " + ", ".join(changed)
    if changed:
        return f"all load; {len(changed)} updated by the run"
    return f"all {len(before)} files identical"


def run_case(case, base, root):
    ws = Workspace(root / case.name, base)
    ws.root.mkdir(parents=True)
    try:
        try:
            job = case.build(ws)
        except Skip as why:
            return Result(case, skipped=str(why))
        prior = case.prior
        if job.drive is None and TRAIN in job.argv and not ws.out.exists():
            ws.prior_run()  # every training case runs over a finished run: does it survive?
            prior = True
        before = snapshot(ws.out) if ws.out.exists() else {}
        proc = Proc(job)
        if job.drive is not None:
            try:
                job.drive(proc, ws)
            except RuntimeError as exc:
                proc.problem = str(exc)
        else:
            proc.start()
            proc.wait()
        if proc.popen is None:
            return Result(case, skipped=proc.problem or "did not start")
        return judge(case, proc, ws, before, prior)
    finally:
        ws.cleanup()


class Base:
    """What many cases share, made once: the dataset, a finished run, an export, foreign weights."""

    def __init__(self, root):
        self.data = root / "data"
        write_dataset(self.data)
        self.long_data = root / "long_data"  # 30 iterations per epoch: long enough to signal
        write_dataset(self.long_data, per_class=40)
        self.run = root / "run"
        cfg = root / "base.yaml"
        cfg.write_text(yaml.safe_dump(base_config(self.data, self.run), sort_keys=False))
        _must([sys.executable, TRAIN, "-c", str(cfg)])
        self.inference = root / "inference"
        _must([sys.executable, EXPORT, "-c", str(cfg), "-o", f"Global.pretrained_model={self.run / 'best_model'}",
               "-o", f"Global.save_inference_dir={self.inference}"])
        self.resnet18 = root / "other.pdparams"
        _must([sys.executable, "-c", "import sys, paddle; sys.path.insert(0, sys.argv[2]);"
               "from ppcls_ft.models import build_model;"
               "paddle.save(build_model({'name': 'ResNet18', 'class_num': 3}).state_dict(), sys.argv[1])",
               str(self.resnet18), str(REPO)])


def _must(argv):
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"setup step failed: {' '.join(argv)}\n{done.stdout}\n{done.stderr}")


# ------------------------------------------------------------------------------ report
def verdict(res):
    if res.skipped:
        return f"skipped: {res.skipped}"
    return "ok" if not res.flags else "**" + "; ".join(res.flags) + "**"


def render(results, root, seconds):
    def clean(text):
        text = text.replace(str(root), "<tmp>").replace(str(REPO), "<repo>").replace("|", "\\|")
        return text if len(text) <= 300 else text[:297] + "..."
    ran = [r for r in results if not r.skipped]
    totals = {
        "cases": len(results), "run": len(ran), "skipped": len(results) - len(ran),
        "ok": sum(not r.flags for r in ran),
        "silent": sum("silent" in r.flags for r in ran),
        "data lost": sum("data lost" in r.flags for r in ran),
        "raw tracebacks": sum("traceback" in r.flags for r in ran),
        "unclear": sum(any(f.startswith("unclear") for f in r.flags) for r in ran),
        "other failures": sum(any(f not in ("silent", "data lost", "traceback") and not f.startswith("unclear")
                                  for f in r.flags) for r in ran),
    }
    lines = [
        "# Reliability: bad inputs and faults",
        "",
        f"Generated by `python benchmarks/reliability.py` on {datetime.date.today()} ({platform.platform()}, "
        f"Python {platform.python_version()}) in {seconds:.0f} s. Do not edit by hand: change the cases in "
        "the script and run it again. Each case is the real command line in a subprocess, on a tiny generated "
        "dataset; `<tmp>` is the case's scratch folder.",
        "",
        "Expected: **error** = a non-zero exit with one `error: ...` line naming the key or file and what to "
        "change (or, for signals, a log line saying how to resume); **warn** = the run finishes and logs a "
        "warning naming the problem; **ok** = it just works. *Earlier outputs*: for training cases a finished run "
        "was copied into `Global.output_dir` first; all its checkpoints must still load, and be "
        "byte-identical when the case fails (n/a: the tool writes no checkpoints).",
        "",
        "**Totals:** " + ", ".join(f"{k}: {v}" for k, v in totals.items()),
        "",
        "| # | group | case | expected | exit | first line of stderr (or the warning logged) | earlier outputs | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(results, 1):
        code = "—" if r.code is None else str(r.code)
        lines.append(f"| {i} | {r.case.group} | {r.case.what} | {r.case.expect} | {code} | "
                     f"{clean(r.message) or '(empty)'} | {r.earlier} | {verdict(r)} |")
    return "\n".join(lines) + "\n", totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "reliability.md"))
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each is one process)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {[c.name for c in CASES]}")
    start = time.time()
    root = Path(tempfile.mkdtemp(prefix="ppcls_ft_reliability_"))
    try:
        base = Base(root / "base")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda c: run_case(c, base, root / "cases"), cases))
        text, totals = render(results, root, time.time() - start)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return results, totals


if __name__ == "__main__":
    main()
