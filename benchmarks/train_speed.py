"""Training speed on CPU, side by side: ppcls_ft's ``tools/train.py`` against PaddleClas's own
``tools/train.py`` on the same PaddleClas configs, with the paddle-inference forward rate of each
model and the machine's fp32 matmul ceiling beside them, and the memory each training run took.

Both trainers run as subprocesses on one generated dataset (photos from ``shared/data/flowers5``,
or synthetic JPEGs without it), the same config file and the same ``-o`` overrides: CPU, no
evaluation, no ``epoch_N`` checkpoints, one log line per iteration, ``--epochs`` short epochs of
``--iters`` iterations. Runs are interleaved ppcls_ft, PaddleClas, PaddleClas, ppcls_ft (times
``--repeats``), so a burst of load from other jobs on this shared machine slows both alike.

- images/s: this script stamps each ``[Train][Epoch e/E][Iter: i/N]`` line as it arrives (both
  trainers print one per iteration with ``Global.print_batch_step=1`` and flush it) and divides
  the images of iterations ``--warmup``+1..N of every epoch by the time between the stamps; the
  first ``--warmup`` iterations of each epoch (loader start, first-call allocations) are dropped.
  Median over a trainer's runs.
- threads: ppcls_ft uses every core; PaddleClas runs as shipped, which on the CPU is one math
  thread (shared/guide/PERFORMANCE.md section 1): the "cores busy" column (CPU time of the trainer
  process over wall time in the timed windows, loader workers excluded) shows what each used.
- forward: the model (ppcls_ft's definition, random weights) exported with ``export_dygraph`` and
  run by ``Predictor(engine="onednn")`` on every core at the training batch, timed with
  ``inference_speed.time_fn``. A training step costs about 3 forward passes (forward, and a
  backward of about twice its cost), so "forward / 3" is the rate training would reach at the
  forward pass's efficiency.
- ceiling: the best GFLOP/s of a 2048x2048 (``--matmul-size``) fp32 matmul, numpy (OpenBLAS; with
  ``OPENBLAS_CORETYPE`` unset, because this machine sets it to Haswell, which drops the AVX-512
  kernels: PERFORMANCE.md section 6) and Paddle (MKL, 1 thread and every core). Share of the
  ceiling = training images/s x 3 x 2 x forward MACs / the highest of these; MACs are counted by
  ``model_table.count_macs`` (conv, linear and matmul multiply-adds, 2 FLOPs each).
- memory: the trainer process's resident set (RSS) sampled every 0.25 s, its peak, and its value
  when each epoch's ``[Avg]`` line arrives (does it grow from epoch to epoch?); and the peak of
  the whole process tree: the trainer's RSS plus each loader worker's private memory (USS).

``--paddleclas DIR`` is a PaddleClas 2.6 source tree (nothing of it is committed here); its
requirements are installed with paddlepaddle 3.3.1 into a venv of its own (``--venv``) on first
use. Without it, ppcls_ft is measured alone.

    python benchmarks/train_speed.py --paddleclas /tmp/paddleclas-src     # full run (about 40 min)
    python benchmarks/train_speed.py --models PPLCNet_x0_25:8 --image-size 32 --iters 3 --warmup 1 \
        --epochs 2 --workers 0 --out /tmp/train_speed.md                 # smoke run, ppcls_ft alone

Writes a markdown table to stdout and to docs/benchmarks/train_speed.md.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's ppcls_ft, not an installed one: what this process measures (exports, forward
# passes) must be the code its child trainers run (an editable install of another checkout was
# imported instead, and an edit there mid-run broke an export).
sys.path.insert(0, str(REPO))
import ppcls_ft  # noqa: E402  (must precede paddle: it sets the MKL fast path on AMD)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from inference_speed import time_fn  # noqa: E402
from model_table import count_macs  # noqa: E402
from ppcls_ft import _cpu, build_model  # noqa: E402
from ppcls_ft.engine.export import export_dygraph  # noqa: E402
from ppcls_ft.predictor import Predictor  # noqa: E402
from ppcls_ft.utils.device import available_cores, cpu_simd  # noqa: E402

# (config name in shared/paddleclas_configs, training batch): issue 12's four models
DEFAULT_MODELS = ("ResNet50:8", "SwinTransformer_tiny_patch4_window7_224:8", "MobileNetV2:16",
                  "PPLCNet_x1_0:32")
PADDLE_VERSION = "3.3.1"  # what PaddleClas's venv gets: the version ppcls_ft is developed on
FT, PC = "ppcls_ft", "PaddleClas"
# ppcls_ft with Paddle's own kernels everywhere (PPCLS_FT_KERNELS=stock): what its CPU kernels
# (ppcls_ft/kernels: dense and depthwise convolution, batch norm, hardswish; LayerNorm and GELU)
# add, measured in the same run; only for the families that use them.
FT_STOCK = "ppcls_ft, stock kernels"
KERNEL_FAMILIES = ("ResNet", "MobileNet", "PPLCNet", "SwinTransformer")
# ppcls_ft on MKL's AVX2 path (PPCLS_FT_MKL=avx2) where it otherwise takes MKL's AVX-512 path (on an
# AMD CPU through ppcls_ft/_cpu.py's shim): what that adds, for the families without such kernels.
FT_AVX2 = "ppcls_ft, MKL AVX2 path"
ITER_LINE = re.compile(r"\[Train\]\[Epoch (\d+)/\d+\]\[Iter: (\d+)/(\d+)\]")
AVG_LINE = re.compile(r"\[Train\]\[Epoch (\d+)/\d+\]\[Avg\]")
# The first iteration's number in each trainer's log: PaddleClas counts from 0, ppcls_ft from 1.
FIRST_ITER = {FT: 1, FT_STOCK: 1, FT_AVX2: 1, PC: 0}
GIB = 1024 ** 3


def shared_dir():
    return Path(os.environ.get("PPCLS_FT_SHARED", REPO.parent / "shared")).resolve()


# ------------------------------------------------------------------------------------ data
def write_dataset(workdir, n_images, source):
    """A PaddleClas file list of ``n_images`` lines; returns (image_root, list, class_num, text).

    ``source``: a folder with ``train_list.txt`` (its photos are listed, shuffled with seed 0,
    repeated if needed), or None for synthetic 256x256 JPEGs (64 distinct, 5 classes)."""
    rng = np.random.default_rng(0)
    out = Path(workdir) / "train_list.txt"
    if source is not None:
        lines = [ln for ln in (Path(source) / "train_list.txt").read_text().splitlines() if ln.strip()]
        class_num = 1 + max(int(ln.split()[-1]) for ln in lines)
        order = rng.permutation(len(lines))
        picked = [lines[order[i % len(lines)]] for i in range(n_images)]
        out.write_text("\n".join(picked) + "\n")
        return Path(source), out, class_num, f"photos listed from `{source}`"
    import cv2
    root = Path(workdir) / "synthetic"
    (root / "images").mkdir(parents=True, exist_ok=True)
    distinct, class_num = min(n_images, 64), 5
    for i in range(distinct):
        img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), img)
    out.write_text("".join(f"images/{i % distinct}.jpg {i % class_num}\n" for i in range(n_images)))
    return root, out, class_num, f"list entries over {distinct} synthetic 256x256 JPEGs"


# ------------------------------------------------------------------------- PaddleClas venv
def paddleclas_python(src, venv):
    """The venv's python with paddlepaddle and ``src/requirements.txt`` installed, and notes on
    what the install had to change. Made once; reused while the requirements are unchanged."""
    req = Path(src) / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes() + PADDLE_VERSION.encode()).hexdigest()[:16]
    py, stamp = Path(venv) / "bin" / "python", Path(venv) / "ppcls_ft_train_speed.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("digest") == digest and py.is_file():
            return py, saved["notes"]
    print(f"creating PaddleClas's venv at {venv} (paddlepaddle=={PADDLE_VERSION} + {req})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    notes = []
    if _pip(pip + [f"paddlepaddle=={PADDLE_VERSION}", "-r", str(req)]) != 0:
        # One resolve failed: install one requirement at a time, a pin that fails without its pin.
        if _pip(pip + [f"paddlepaddle=={PADDLE_VERSION}"]) != 0:
            raise RuntimeError(f"pip could not install paddlepaddle=={PADDLE_VERSION} into {venv}")
        for line in req.read_text().splitlines():
            spec = line.split("#")[0].strip()
            if not spec or _pip(pip + [spec]) == 0:
                continue
            bare = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]
            if bare == spec or _pip(pip + [bare]) != 0:
                raise RuntimeError(f"pip could not install {spec!r} from {req} into {venv}")
            notes.append(f"`{spec}` did not install on Python {platform.python_version()}; "
                         f"installed `{bare}` unpinned")
    if not notes:
        notes.append("requirements.txt installed as pinned, no change")
    stamp.write_text(json.dumps({"digest": digest, "notes": notes}))
    return py, notes


def _pip(cmd):
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def python_versions(py):
    """(paddle version, python version) of another interpreter."""
    out = subprocess.run([str(py), "-c", "import platform, paddle; print(paddle.__version__, "
                          "platform.python_version())"], capture_output=True, text=True, check=True)
    return tuple(out.stdout.split()[-2:])


def paddleclas_version(src):
    version = (Path(src) / "version.txt")
    text = version.read_text().strip() if version.is_file() else "unknown version"
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)
    return text + (f", commit {commit.stdout.strip()}" if commit.returncode == 0 else "")


# --------------------------------------------------------------------------- commands
def overrides(cfg, data, bs, args, out_dir):
    """The ``-o`` overrides both trainers get (PaddleClas's syntax, which ppcls_ft accepts)."""
    root, lst, class_num, _ = data
    o = ["Global.device=cpu", f"Global.epochs={args.epochs}", "Global.eval_during_train=False",
         "Global.print_batch_step=1", f"Global.save_interval={args.epochs + 1}",  # no epoch_N files
         "Global.use_visualdl=False", f"Global.output_dir={out_dir}", f"Arch.class_num={class_num}",
         f"DataLoader.Train.sampler.batch_size={bs}"]
    for split in ("Train", "Eval"):  # ppcls_ft checks the Eval list exists even with eval off
        o += [f"DataLoader.{split}.dataset.image_root={root}",
              f"DataLoader.{split}.dataset.cls_label_path={lst}"]
    if args.workers >= 0:
        o.append(f"DataLoader.Train.loader.num_workers={args.workers}")
    if (cfg.get("Arch") or {}).get("pretrained"):
        o.append("Arch.pretrained=False")  # speed does not depend on the weights; no download
    if "warmup_epoch" in (cfg.get("Optimizer", {}).get("lr") or {}):
        o.append("Optimizer.lr.warmup_epoch=0")  # ppcls_ft refuses more warm-up epochs than epochs
    if "learning_rate" in (cfg.get("Optimizer", {}).get("lr") or {}):
        # speed does not depend on it, and from random weights without warm-up PPLCNet_x1_0's
        # 0.8 reached a NaN loss in 28 steps, where ppcls_ft stops (PaddleClas trains on in NaN)
        o.append("Optimizer.lr.learning_rate=0.001")
    if args.image_size:
        ops = cfg["DataLoader"]["Train"]["dataset"]["transform_ops"]
        crop = next(i for i, op in enumerate(ops) if isinstance(op, dict) and "RandCropImage" in op)
        o.append(f"DataLoader.Train.dataset.transform_ops.{crop}.RandCropImage.size={args.image_size}")
    return o


def commands(config, opts, pc_python, pc_src):
    """{trainer: (argv, cwd)}: each trainer's own tools/train.py, run from its own tree."""
    tail = ["-c", str(config)] + [x for o in opts for x in ("-o", o)]
    cmds = {FT: ([sys.executable, str(REPO / "tools" / "train.py")] + tail, str(REPO))}
    cmds[FT_STOCK] = cmds[FT_AVX2] = cmds[FT]
    if pc_python is not None:
        cmds[PC] = ([str(pc_python), str(Path(pc_src) / "tools" / "train.py")] + tail, str(pc_src))
    return cmds


def child_env(tool=FT):
    """This process's environment, for each trainer. ppcls_ft chooses its MKL path itself (its
    import in this process has already done so: ``MKL_DEBUG_CPU_TYPE=5`` here means it took the
    AVX2 route). PaddleClas gets ``MKL_DEBUG_CPU_TYPE=5`` on an AMD CPU: MKL's AVX2 path, the best
    an environment variable gives it, rather than the generic path it has as shipped. PYTHONPATH:
    this checkout for ppcls_ft, none for PaddleClas's own venv."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PPCLS_FT_KERNELS", None)
    env.pop("PPCLS_FT_MKL", None)
    if _cpu.STATE["route"] == "avx2":  # set by this process's ppcls_ft, not by the user
        env.pop("MKL_DEBUG_CPU_TYPE", None)
        env.pop("MKL_ENABLE_INSTRUCTIONS", None)
    if tool in (FT, FT_STOCK, FT_AVX2):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        if tool == FT_STOCK:
            env["PPCLS_FT_KERNELS"] = "stock"
        if tool == FT_AVX2:
            env["PPCLS_FT_MKL"] = "avx2"
    else:
        env.pop("PYTHONPATH", None)
        if ppcls_ft.CPU_VENDOR == "AMD":
            env.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    return env


def shim_active():
    """Whether ppcls_ft took MKL's AVX-512 path (the vendor shim) in this process, so its children too."""
    return _cpu.STATE["route"] == "shim"


def avx512_path():
    """Whether ppcls_ft's children take MKL's AVX-512 path: through the shim on AMD, natively on
    an Intel CPU with AVX-512."""
    return shim_active() or (_cpu.STATE["route"] == "native" and _cpu.has_avx512())


def comparison_run(arch):
    """The ppcls_ft variant measured beside ppcls_ft for this model, or None."""
    if arch.startswith(KERNEL_FAMILIES):
        return FT_STOCK
    return FT_AVX2 if avx512_path() else None


# ---------------------------------------------------------------------------- one run
class MemorySampler(threading.Thread):
    """Every ``interval`` s the RSS of ``pid``, every ``TREE_EVERY`` samples that plus its
    children's private memory (USS):
    what the trainer and its loader workers take together, the pages a forked worker shares with
    the trainer counted once. (PSS would also split pages shared with unrelated processes, such
    as another job's copy of libpaddle, and so depend on what else runs.)"""

    # The RSS (/proc/PID/statm) is cheap; the workers' USS needs /proc/PID/smaps, which for a
    # process with Paddle loaded takes tens of ms to read: sampled every 0.25 s it cost this
    # process 30 % of a core, stolen from the trainer being timed. So the tree is read every 2 s.
    TREE_EVERY = 8

    def __init__(self, pid, interval=0.25):
        super().__init__(daemon=True)
        self.proc, self.interval = psutil.Process(pid), interval
        self.peak_rss = self.peak_tree = 0
        self.done = threading.Event()

    def rss(self):
        try:
            return self.proc.memory_info().rss
        except psutil.Error:
            return 0

    def tree(self):
        try:
            children = self.proc.children(recursive=True)
        except psutil.Error:
            return 0
        total = self.rss()
        for p in children:
            try:
                total += p.memory_full_info().uss
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def run(self):
        tick = 0
        while not self.done.wait(self.interval):
            rss = self.rss()
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_tree = max(self.peak_tree, rss if tick % self.TREE_EVERY else self.tree())
            tick += 1


def run_training(argv, cwd, env, log_path, first_iter):
    """Run one training; returns its stamps, per-epoch RSS, memory peaks and trainer CPU time.

    ``stamps[(epoch, i)] = (wall s, trainer CPU s)`` when iteration i (counted from 1) was logged."""
    stamps, epoch_rss = {}, {}
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            m = ITER_LINE.search(line)
            if m:
                stamps[(int(m[1]), int(m[2]) - first_iter + 1)] = (now, _cpu_seconds(sampler.proc))
            elif AVG_LINE.search(line):
                epoch_rss[int(AVG_LINE.search(line)[1])] = sampler.rss()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    if rc != 0:
        tail = "".join(Path(log_path).read_text(encoding="utf-8").splitlines(True)[-25:])
        raise RuntimeError(f"{' '.join(map(shlex.quote, argv))}\nexited with {rc}; log {log_path}:\n{tail}")
    return {"stamps": stamps, "epoch_rss": epoch_rss, "peak_rss": sampler.peak_rss,
            "peak_tree": sampler.peak_tree}


def _cpu_seconds(proc):
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def timed_windows(run, bs, args):
    """(images/s, cores busy) over iterations warmup+1..iters of every epoch."""
    images = wall = cpu = 0.0
    for epoch in range(1, args.epochs + 1):
        try:
            (w0, c0), (w1, c1) = run["stamps"][(epoch, args.warmup)], run["stamps"][(epoch, args.iters)]
        except KeyError as exc:
            raise RuntimeError(f"no log line for epoch/iteration {exc}: the log format changed?") from exc
        images, wall, cpu = images + (args.iters - args.warmup) * bs, wall + w1 - w0, cpu + c1 - c0
    return images / wall, cpu / wall


# ----------------------------------------------------------------------- reference rates
def forward_rate(arch, class_num, bs, size, threads, args, workdir):
    """(paddle-inference oneDNN images/s at batch ``bs``, forward MACs per image)."""
    model = build_model({"name": arch, "class_num": class_num})
    model.eval()
    macs = count_macs(model, size)
    out = export_dygraph(model, Path(workdir) / f"export_{arch}", [3, size, size],
                         [{"ToCHWImage": None}], model_name=arch)
    pred = Predictor(out, engine="onednn", cpu_threads=threads, batch_size=bs)
    batch = np.random.default_rng(0).standard_normal([bs, 3, size, size]).astype(np.float32)
    return time_fn(pred.run_graph, batch, args.fwd_warmup, args.fwd_iters), macs


# numpy runs in a fresh process: OPENBLAS_CORETYPE is read when numpy loads OpenBLAS.
NUMPY_MATMUL = """
import sys, time, numpy as np
n = int(sys.argv[1])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = a.copy()
a @ b
times = []
for _ in range(5):
    start = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - start)
print(2 * n ** 3 / min(times) / 1e9)
"""


def paddle_matmul_gflops(n, threads):
    """This process's Paddle (MKL, loaded after ppcls_ft set its environment), best of 5."""
    paddle.base.core.set_num_threads(threads)
    a, b = paddle.randn([n, n]), paddle.randn([n, n])
    paddle.matmul(a, b).numpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        paddle.matmul(a, b).numpy()  # .numpy(): the CPU op has finished
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def matmul_ceiling(n, threads):
    """{label: GFLOP/s} of an n x n fp32 matmul: numpy and Paddle, best of 5 each."""
    env = child_env()
    runs = {"numpy (OpenBLAS, OPENBLAS_CORETYPE unset)":
            {k: v for k, v in env.items() if k != "OPENBLAS_CORETYPE"}}
    if "OPENBLAS_CORETYPE" in env:
        runs[f"numpy (OpenBLAS, OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} as set here)"] = env
    out = {label: float(subprocess.run([sys.executable, "-c", NUMPY_MATMUL, str(n)], env=e, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
           for label, e in runs.items()}
    mkl = ", AVX-512 path (ppcls_ft's shim)" if shim_active() else ", AVX-512 path" if avx512_path() else (
        f", MKL_DEBUG_CPU_TYPE={env['MKL_DEBUG_CPU_TYPE']}" if "MKL_DEBUG_CPU_TYPE" in env else "")
    for t in sorted({1, threads}):  # 1 thread: what PaddleClas's training gets
        out[f"paddle (MKL, {t} thread{'s' if t > 1 else ''}{mkl})"] = paddle_matmul_gflops(n, t)
    return out


# ------------------------------------------------------------------------ one model
def crop_size(cfg):
    ops = cfg["DataLoader"]["Train"]["dataset"]["transform_ops"]
    return int(next(op["RandCropImage"]["size"] for op in ops
                    if isinstance(op, dict) and "RandCropImage" in op))


def bench_model(spec, args, source, pc, workdir, threads):
    """Forward rate, then the interleaved training runs of one ``NAME:BATCH``; returns a result."""
    name, bs = spec.rsplit(":", 1) if ":" in spec else (spec, None)
    config = Path(args.configs) / f"{name}.yaml"
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    bs = int(bs or cfg["DataLoader"]["Train"]["sampler"]["batch_size"])
    arch, size = cfg["Arch"]["name"], args.image_size or crop_size(cfg)
    data = write_dataset(_mkdir(workdir / name), bs * args.iters, source)
    fwd, macs = forward_rate(arch, data[2], bs, size, threads, args, workdir)
    print(f"{name} bs{bs}: paddle-inference forward {fwd:.2f} images/s, {macs / 1e9:.4g} GMACs/image",
          flush=True)
    variant = comparison_run(arch) if args.stock_kernels else None
    first = [FT, variant] if variant else [FT]
    order = (first + ([PC, PC] if pc[0] is not None else []) + first[::-1]) * args.repeats
    runs = {tool: [] for tool in dict.fromkeys(order)}
    for k, tool in enumerate(order):
        out_dir = workdir / name / f"output_{k}"
        argv, cwd = commands(config, overrides(cfg, data, bs, args, out_dir), *pc)[tool]
        log = workdir / name / f"{tool}_{k}.log"
        run = run_training(argv, cwd, child_env(tool), log, FIRST_ITER[tool])
        shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints: up to 100 MB a run
        run["rate"], run["cores"] = timed_windows(run, bs, args)
        runs[tool].append(run)
        rss = ", ".join(f"{run['epoch_rss'].get(e, 0) / GIB:.2f}" for e in range(1, args.epochs + 1))
        print(f"  {tool} run {len(runs[tool])}: {run['rate']:.2f} images/s, {run['cores']:.2f} cores "
              f"busy, peak RSS {run['peak_rss'] / GIB:.2f} GiB, RSS after each epoch {rss} GiB",
              flush=True)
    return {"name": name, "arch": arch, "batch": bs, "size": size, "forward": fwd, "macs": macs,
            "runs": runs, "data": data[3], "amp": bool((cfg.get("AMP") or {}).get("use_amp"))}


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def summarize(runs, epochs):
    """Median rate and cores, the largest peaks, median RSS per epoch, largest epoch-1-to-last growth."""
    per_epoch = [statistics.median(r["epoch_rss"].get(e, 0) for r in runs) for e in range(1, epochs + 1)]
    return {"rate": statistics.median(r["rate"] for r in runs), "rates": [r["rate"] for r in runs],
            "cores": statistics.median(r["cores"] for r in runs),
            "peak_rss": max(r["peak_rss"] for r in runs), "peak_tree": max(r["peak_tree"] for r in runs),
            "epoch_rss": per_epoch,
            "growth": max(r["epoch_rss"].get(epochs, 0) - r["epoch_rss"].get(1, 0) for r in runs)}


# ------------------------------------------------------------------------------ table
def rows_markdown(results, ceiling, epochs):
    head = ["| model | batch | trainer | images/s: median (runs) | ÷ PaddleClas | ÷ (forward / 3) "
            "| share of ceiling | cores busy | peak RSS (GiB) | peak with workers (GiB) "
            f"| RSS after epoch {', '.join(map(str, range(1, epochs + 1)))} (GiB) "
            f"| RSS growth, epoch 1 to {epochs} (MiB) |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    body = []
    for res in results:
        stats = {tool: summarize(runs, epochs) for tool, runs in res["runs"].items()}
        for tool, s in stats.items():
            vs_pc = f"{s['rate'] / stats[PC]['rate']:.2f}x" if PC in stats else "n/a"
            share = s["rate"] * 6 * res["macs"] / (ceiling * 1e9)
            body.append(
                f"| {res['name']} | {res['batch']} | {tool} | {s['rate']:.2f} "
                f"({', '.join(f'{r:.2f}' for r in s['rates'])}) | {vs_pc} | "
                f"{s['rate'] / (res['forward'] / 3):.2f} | {share:.1%} | {s['cores']:.2f} | "
                f"{s['peak_rss'] / GIB:.2f} | {s['peak_tree'] / GIB:.2f} | "
                f"{', '.join(f'{v / GIB:.2f}' for v in s['epoch_rss'])} | {s['growth'] / 2 ** 20:+.0f} |")
    return head + body


def forward_markdown(results, threads):
    head = [f"| model | batch | input | forward GMACs / image | paddle-inference forward, oneDNN, "
            f"{threads} threads (images/s) | forward / 3 (images/s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    return head + [f"| {r['name']} | {r['batch']} | {r['size']} | {r['macs'] / 1e9:.4g} | "
                   f"{r['forward']:.2f} | {r['forward'] / 3:.2f} |" for r in results]


def trainers_note(info):
    threads, pc = info["threads"], info.get("paddleclas")
    ft = f"- trainers: ppcls_ft's `tools/train.py` (every core: `set_num_threads({threads})`)"
    if not pc:
        return ft + "; PaddleClas not measured (no `--paddleclas`)."
    return (ft + f" and PaddleClas {pc['version']} `tools/train.py` from `{pc['src']}`, unpatched, "
            "run as shipped: one math thread on the CPU (PERFORMANCE.md section 1), in its own venv "
            f"(paddle {pc['paddle']}, Python {pc['python']}; install: {'; '.join(pc['notes'])}). "
            "The only CPU setting it needs on Paddle 3.3.1 is `-o Global.device=cpu`, which both get.")


def runs_note(args, pc):
    extra = ((", the workers" if args.workers >= 0 else "")
             + (", the RandCropImage size" if args.image_size else ""))
    order = "ppcls_ft, PaddleClas, PaddleClas, ppcls_ft" if pc else "ppcls_ft, ppcls_ft"
    if args.stock_kernels:
        order += (f" (with a comparison run: ppcls_ft, X, ..., X, ppcls_ft; X is {FT_STOCK!r}, "
                  f"ppcls_ft with PPCLS_FT_KERNELS=stock, for {', '.join(KERNEL_FAMILIES)}"
                  + (f", and {FT_AVX2!r}, ppcls_ft with PPCLS_FT_MKL=avx2, for the others"
                     if avx512_path() else "") + ")")
    return (f"- runs: each config from `{args.configs}` with the same `-o` overrides for both: "
            "`Global.device=cpu Global.epochs=E Global.eval_during_train=False "
            "Global.print_batch_step=1 Global.save_interval=E+1 Global.use_visualdl=False "
            "Global.output_dir=TMP Arch.class_num=C`, the batch size, the dataset paths (Train and "
            "Eval), `Optimizer.lr.warmup_epoch=0` where the config has one and `Arch.pretrained=False` "
            f"where it is True{extra}. {args.epochs} epochs of {args.iters} iterations; order {order}, "
            f"{args.repeats} time(s) per model.")


def markdown(results, ceilings, args, argv, info):
    threads = info["threads"]
    ceiling_label, ceiling = max(ceilings.items(), key=lambda kv: kv[1])
    amp = [r["name"] for r in results if r["amp"]]
    lines = [
        "# Training speed (images/s, CPU): ppcls_ft vs PaddleClas", "",
        f"Generated by `python benchmarks/train_speed.py {' '.join(map(shlex.quote, argv))}` on "
        f"{time.strftime('%Y-%m-%d')}: {ppcls_ft.CPU_VENDOR} CPU "
        f"({platform.processor() or platform.machine()}, {cpu_simd()}), {threads} cores, "
        f"Python {platform.python_version()}, paddle {paddle.__version__}.", "",
        *(["**Smoke run**: too few iterations (or a reduced image size) for reliable numbers; rerun "
           "with the defaults.", ""] if args.iters < 10 or args.image_size else []),
        trainers_note(info),
        f"- environment: MKL for ppcls_ft: {_cpu.mkl_route_text()}; for PaddleClas: "
        + (f"MKL_DEBUG_CPU_TYPE={child_env(PC).get('MKL_DEBUG_CPU_TYPE', 'unset')} (on AMD: MKL's "
           "AVX2 path, the best an environment variable gives it; as shipped it runs MKL's generic "
           "path). " if ppcls_ft.CPU_VENDOR == "AMD" else
           f"MKL's native path (MKL picks its best path itself on this {ppcls_ft.CPU_VENDOR} CPU). ")
        + f"Both: OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, PYTHONUNBUFFERED=1 "
        "(PYTHONPATH: this checkout for ppcls_ft, unset for PaddleClas).",
        f"- data: for each model, batch x {args.iters} {results[0]['data'] if results else ''} "
        f"(one epoch), training crop {args.image_size or 'as in the config (224)'}, loader workers "
        f"{args.workers if args.workers >= 0 else 'as in each config'} for both.",
        runs_note(args, "paddleclas" in info),
        f"- images/s: iterations {args.warmup + 1}-{args.iters} of every epoch, timed by this script "
        "from the arrival of each trainer's per-iteration log line; median over runs (each run in "
        "parentheses). Cores busy: CPU time of the trainer process / wall time in those windows "
        "(loader workers excluded).",
        *([f"- AMP: {', '.join(amp)} asks for float16 AMP. On the CPU, Paddle 3.3.1's `decorate` "
           "(O2) keeps float32 weights and `auto_cast` \"makes no effect\" (its warning), so "
           "PaddleClas trains in float32; ppcls_ft refuses float16 on the CPU with a warning and "
           "trains in float32 too."] if amp else []),
        f"- forward: ppcls_ft's model definition, random weights, `export_dygraph` + "
        f"`Predictor(engine=\"onednn\", cpu_threads={threads})` at the training batch, "
        f"{args.fwd_warmup} warm-up + {args.fwd_iters} timed batches. ÷ (forward / 3): training "
        "images/s over a third of the forward rate (a training step costs about 3 forward passes).",
        f"- ceiling, {args.matmul_size}x{args.matmul_size} fp32 matmul, best of 5: "
        + "; ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceilings.items())
        + f". Share of ceiling = images/s x 3 x 2 x forward MACs / {ceiling:.0f} GFLOP/s "
        f"({ceiling_label}); MACs counted by `model_table.count_macs` (conv, linear, matmul).",
        "- memory: RSS of the trainer process sampled every 0.25 s (peak) and read when each "
        "epoch's `[Avg]` line arrives (median over runs; growth: the largest of the runs); with "
        "workers: the trainer's RSS plus each loader worker's private memory (USS), peak.", "",
    ]
    return "\n".join(lines + rows_markdown(results, ceiling, args.epochs) + [""]
                     + forward_markdown(results, threads)) + "\n"


# ------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description="ppcls_ft vs PaddleClas training speed on CPU")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="NAME:BATCH, NAME a config in --configs (batch default: the config's)")
    parser.add_argument("--paddleclas", default=None, help="a PaddleClas 2.6 source tree")
    parser.add_argument("--venv", default=str(Path.home() / ".cache" / "ppcls_ft" / "paddleclas-venv"),
                        help="PaddleClas's venv (made on first use)")
    parser.add_argument("--configs", default=str(shared_dir() / "paddleclas_configs"))
    parser.add_argument("--data", default=None, help="a PaddleClas-format folder with train_list.txt "
                        "(default: shared/data/flowers5), or 'synthetic'")
    parser.add_argument("--iters", type=int, default=12, help="iterations per epoch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations at each epoch's start")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="ABBA blocks per model")
    parser.add_argument("--no-stock-kernels", dest="stock_kernels", action="store_false",
                        help="skip the ppcls_ft run with Paddle's own kernels (PPCLS_FT_KERNELS=stock)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers; -1: the config's")
    parser.add_argument("--image-size", type=int, default=None, help="training crop (default: config's)")
    parser.add_argument("--fwd-iters", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n ceiling matmul")
    parser.add_argument("--fwd-warmup", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep logs here (default: a temporary folder)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "train_speed.md"))
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.iters:
        parser.error("need 1 <= --warmup < --iters (the window starts at a logged iteration)")
    return args


def data_source(arg):
    if arg == "synthetic":
        return None
    if arg:
        return Path(arg)
    flowers = shared_dir() / "data" / "flowers5"
    return flowers if (flowers / "train_list.txt").is_file() else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    threads = available_cores()
    paddle.set_device("cpu")
    info, pc = {"threads": threads}, (None, None)
    if args.paddleclas:
        src = Path(args.paddleclas).resolve()
        if not (src / "tools" / "train.py").is_file() or not (src / "requirements.txt").is_file():
            raise SystemExit(f"--paddleclas {src}: not a PaddleClas source tree (tools/train.py, "
                             "requirements.txt)")
        py, notes = paddleclas_python(src, Path(args.venv))
        pdl, pyv = python_versions(py)
        info["paddleclas"] = {"src": src, "version": paddleclas_version(src), "notes": notes,
                              "paddle": pdl, "python": pyv}
        pc = (py, src)
    ceilings = matmul_ceiling(args.matmul_size, threads)
    print("ceiling: " + "; ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceilings.items()), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        for spec in args.models:
            results.append(bench_model(spec, args, data_source(args.data), pc, workdir, threads))
            table = markdown(results, ceilings, args, argv, info)  # written after every model
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            Path(args.out).write_text(table, encoding="utf-8")
    print(table)
    return results


if __name__ == "__main__":
    main()
