"""The model table in docs/models.md: every registered model, its size, cost, weights and CPU latency.

For each name in ``ppcls_ft.list_models()`` (random weights, ``class_num: 1000``):

- parameters: the sum of ``numel`` over parameters that take gradients (batch-norm running
  statistics are Paddle parameters too, but are not counted);
- MACs at the default input (224, or 384 for ``*_384`` models), counted by this script with
  forward hooks on ``Conv2D`` and ``Linear`` and by wrapping ``paddle.matmul`` (Swin attention
  ``q @ k^T`` and ``attn @ v`` are ``paddle.matmul`` calls, not layers). One MAC is one
  multiply-add; PaddleClas and most papers call this number "FLOPs". Norms, activations, pooling,
  softmax and additions are not counted. ``paddle.flops`` is not used: on Paddle 3.3.1 it raises
  ``TypeError: only 0-dimensional arrays can be converted to Python scalars`` already for
  ResNet50, and its layer hooks would miss the attention matmuls anyway;
- official weights: ``ppcls_ft.models._urls`` (plain, ``use_ssld: true``, ``pretrained_variant:
  22kto1k``);
- CPU latency, batch 1, dygraph eval under ``paddle.no_grad``, every core
  (``setup_device("cpu")``): 2 warm-up calls, then the median and the minimum of N timed calls.
  N is ``--iters``, lowered for slow models so one model takes about ``--budget`` seconds
  (never below 3).

    python benchmarks/model_table.py                       # every model (10-20 min on 2 cores)
    python benchmarks/model_table.py --models PPLCNet_x0_25 ResNet18 --iters 3 --out /tmp/t.md
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's ppcls_ft, not an installed one: what this process measures (exports, forward
# passes) must be the code its child trainers run (an editable install of another checkout was
# imported instead, and an edit there mid-run broke an export).
sys.path.insert(0, str(REPO))
import ppcls_ft  # noqa: E402  (must precede paddle: it sets the MKL fast path on AMD)

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402

from ppcls_ft.models import _urls  # noqa: E402
from ppcls_ft.utils.device import available_cores, cpu_simd, setup_device  # noqa: E402

WARMUP = 2


def input_size(name):
    return 384 if name.endswith("_384") else 224


def count_params(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def count_macs(model, size):
    """Multiply-adds of one forward pass on a ``[1, 3, size, size]`` input (see module docstring)."""
    total = [0]

    def conv_hook(layer, inputs, output):
        kh, kw = layer.weight.shape[2], layer.weight.shape[3]
        in_per_group = layer.weight.shape[1]  # Paddle Conv2D weight: [out, in / groups, kh, kw]
        total[0] += int(np.prod(output.shape)) * in_per_group * kh * kw

    inside_linear = [0]  # a Linear may run its product through paddle.matmul (models/layers.py)

    def linear_pre_hook(layer, inputs):
        inside_linear[0] += 1

    def linear_hook(layer, inputs, output):
        inside_linear[0] -= 1
        total[0] += int(np.prod(output.shape)) * layer.weight.shape[0]  # weight: [in, out]

    hooks = []
    for layer in model.sublayers():
        if isinstance(layer, nn.Conv2D):
            hooks.append(layer.register_forward_post_hook(conv_hook))
        elif isinstance(layer, nn.Linear):
            hooks.append(layer.register_forward_pre_hook(linear_pre_hook))
            hooks.append(layer.register_forward_post_hook(linear_hook))
    real_matmul = paddle.matmul

    def counting_matmul(x, y, transpose_x=False, transpose_y=False, name=None):
        out = real_matmul(x, y, transpose_x=transpose_x, transpose_y=transpose_y, name=name)
        if not inside_linear[0]:  # counted once, by the Linear's hook
            inner = x.shape[-2] if transpose_x else x.shape[-1]
            total[0] += int(np.prod(out.shape)) * inner
        return out

    paddle.matmul = counting_matmul
    try:
        with paddle.no_grad():
            model(paddle.zeros([1, 3, size, size], dtype="float32"))
    finally:
        paddle.matmul = real_matmul
        for h in hooks:
            h.remove()
    return total[0]


def latency_ms(model, size, iters, budget):
    """Milliseconds of one batch-1 forward; returns (median, minimum, number of timed calls)."""
    x = np.random.default_rng(0).standard_normal([1, 3, size, size]).astype("float32")
    x = paddle.to_tensor(x)
    times = []
    with paddle.no_grad():
        for _ in range(WARMUP):
            start = time.perf_counter()
            model(x).numpy()
            times.append(time.perf_counter() - start)
        n = max(3, min(iters, int(budget / max(times[-1], 1e-6))))
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model(x).numpy()  # .numpy() waits for the result
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), 1000 * min(times), n


def weights_cell(name):
    if not _urls.has_official_weights(name):
        return "no", ""
    flavours = _urls.OFFICIAL_URLS[name]
    kinds = []
    if None in flavours:
        plain = _urls.official_url(name)
        kinds.append("22kto1k only" if plain == flavours.get("22kto1k") else "ImageNet-1k")
    if "ssld" in flavours:
        kinds.append("`use_ssld`")
    if "22kto1k" in flavours and "22kto1k only" not in kinds:
        kinds.append("`22kto1k`")
    url = _urls.official_url(name)
    return "yes: " + ", ".join(kinds), f"[{Path(url).name}]({url})"


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args, threads, load_start, load_end, argv):
    cmd = "python benchmarks/model_table.py" + ("" if not argv else " " + " ".join(argv))
    return [
        "# Model table", "",
        f"Every registered model (`ppcls_ft.list_models()`), built with `class_num: 1000` and "
        f"random weights. Generated on {datetime.date.today().isoformat()} by `{cmd}` on: "
        f"{cpu_model()} ({cpu_simd()}), {available_cores()} cores, {threads} math threads, "
        f"paddle {paddle.__version__}, Python {platform.python_version()}. The machine was "
        f"shared with other jobs (1-minute load average {load_start:.1f} at start, "
        f"{load_end:.1f} at end), so latencies are upper bounds: compare rows with each other, "
        f"and prefer the min column.", "",
        "- **Params**: parameters that take gradients (batch-norm running statistics excluded), "
        "millions.",
        "- **GMACs**: multiply-adds of one forward pass at the input size shown, counted by this "
        "script with forward hooks on `Conv2D`/`Linear` plus a wrapper around `paddle.matmul` "
        "(Swin attention). PaddleClas's tables call this number \"FLOPs\". Norms, activations, "
        "pooling and additions are not counted. `paddle.flops` is not used: on Paddle 3.3.1 it "
        "raises a `TypeError` even for ResNet50, and it would not see the attention matmuls.",
        "- **Official weights**: from `ppcls_ft/models/_urls.py`. `Arch.pretrained: True` downloads "
        "the linked file; `use_ssld: True` and `pretrained_variant: 22kto1k` select the listed "
        "variants. \"22kto1k only\": the default file is the ImageNet-22k-pretrained one.",
        f"- **CPU ms**: batch 1, dygraph `model.eval()` under `paddle.no_grad()`, all cores via "
        f"`setup_device(\"cpu\")`, preprocessing excluded. {WARMUP} warm-up calls, then N timed "
        f"calls; median and fastest call. N = `--iters` ({args.iters}), lowered for slow models "
        f"to about {args.budget:g} s per model (`--budget`), at least 3. For deployment speed "
        f"(paddle-inference, oneDNN) see [benchmarks/inference_speed.md](benchmarks/inference_speed.md).",
        "",
        "| model | input | Params (M) | GMACs | official weights | default file | CPU ms median "
        "| CPU ms min | N |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]


def main(argv=None):
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="params, MACs, weights and CPU latency of every model")
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per model")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per model")
    parser.add_argument("--out", default=str(REPO / "docs" / "models.md"))
    args = parser.parse_args(raw)
    _, banner = setup_device("cpu")
    threads = paddle.base.core.get_num_threads() if hasattr(paddle.base.core, "get_num_threads") \
        else available_cores()
    load_start = os.getloadavg()[0]
    names = args.models or ppcls_ft.list_models()
    rows = []
    for name in names:
        size = input_size(name)
        model = ppcls_ft.build_model({"name": name, "class_num": 1000})
        model.eval()
        params = count_params(model)
        macs = count_macs(model, size)
        ms, best, n = latency_ms(model, size, args.iters, args.budget)
        weights, url = weights_cell(name)
        rows.append(f"| {name} | {size} | {params / 1e6:.2f} | {macs / 1e9:.3f} | {weights} | {url} "
                    f"| {ms:.1f} | {best:.1f} | {n} |")
        print(f"{name}: {params / 1e6:.2f} M params, {macs / 1e9:.3f} GMACs @ {size}, {ms:.1f} ms "
              f"(median of {n}, min {best:.1f}), weights {weights}", flush=True)
        del model
    lines = header(args, threads, load_start, os.getloadavg()[0], raw) + rows
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
