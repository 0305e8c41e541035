"""Inference speed on CPU: the default Predictor (engine ``auto``), paddle-inference engines (oneDNN,
no oneDNN, Paddle's bundled OpenVINO), ONNX Runtime and dygraph eval, with each engine's largest
probability difference from dygraph.

All three run in one process on one machine, side by side (absolute numbers differ between
hosts: shared/guide/PERFORMANCE.md). Each model is built with random weights (speed does not
depend on them), exported with ``export_dygraph`` and served with ``Predictor``; dygraph runs
under ``paddle.no_grad`` with ``paddle.base.core.set_num_threads(all cores)``. Timed: the forward
pass on a ready float32 batch (preprocessing excluded), after warm-up iterations.

    python benchmarks/inference_speed.py                      # full run (minutes)
    python benchmarks/inference_speed.py --models PPLCNet_x0_25 --iters 2   # smoke run

Writes a markdown table to stdout and to docs/benchmarks/inference_speed.md.
"""
import argparse
import os
import platform
import sys
import tempfile
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

from ppcls_ft import build_model  # noqa: E402
from ppcls_ft.engine.export import export_dygraph  # noqa: E402
from ppcls_ft.predictor import Predictor  # noqa: E402
from ppcls_ft.utils.device import available_cores, cpu_simd  # noqa: E402

DEFAULT_MODELS = ("PPLCNet_x1_0", "ResNet50", "SwinTransformer_tiny", "MobileNetV2")
ALIASES = {"SwinTransformer_tiny": "SwinTransformer_tiny_patch4_window7_224",
           "SwinTransformer_base": "SwinTransformer_base_patch4_window7_224"}
BATCH_SIZES = (1, 8)


def time_fn(fn, batch, warmup, iters):
    """Images per second of ``fn(batch)`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn(batch)
    start = time.perf_counter()
    for _ in range(iters):
        fn(batch)
    return iters * len(batch) / (time.perf_counter() - start)


def time_interleaved(fns, batch, warmup, iters, rounds=5):
    """Median images/s per function over ``rounds`` rounds, each timing every function for
    ``iters / rounds`` calls in turn: on a machine shared with other jobs, a burst of load then
    slows every engine alike instead of whichever happened to be running."""
    per_round = max(1, iters // rounds)
    for fn in fns.values():
        for _ in range(warmup):
            fn(batch)
    rates = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            rates[k].append(time_fn(fn, batch, 0, per_round))
    return {k: float(np.median(v)) for k, v in rates.items()}


ENGINES = ("onednn", "native", "openvino", "onnxruntime")


def bench_model(name, size, threads, warmup, iters, workdir):
    """Rows ``(model, batch, {engine: images/s}, {engine: max |p - p_dygraph|})`` for one model."""
    arch = ALIASES.get(name, name)
    model = build_model({"name": arch, "class_num": 1000})
    model.eval()
    # The default export: ONNX too (the [cpu] extra), both engines certified, timed, the fastest
    # recorded for the default Predictor ("auto"), whose choice is measured here beside the rest.
    out = export_dygraph(model, Path(workdir) / arch, [3, size, size], [{"ToCHWImage": None}],
                         model_name=arch, serve_batch=max(BATCH_SIZES))
    engines = {}
    for key in ENGINES + ("auto",):
        if key == "onnxruntime" and not (out / "inference.onnx").is_file():
            continue  # paddle2onnx or onnxruntime not installed
        # batch_size = the largest batch, so run_graph runs each batch in one call
        pred = Predictor(out, engine=key, cpu_threads=threads, batch_size=max(BATCH_SIZES))
        engines[key] = pred.run_graph
        if key == "auto":
            chosen = pred.plan
    def dygraph(batch):
        with paddle.no_grad():
            return paddle.nn.functional.softmax(model(paddle.to_tensor(batch)), axis=-1).numpy()

    engines["dygraph"] = dygraph
    rows = []
    for bs in BATCH_SIZES:
        batch = np.random.default_rng(0).standard_normal([bs, 3, size, size]).astype(np.float32)
        ref = dygraph(batch)
        diffs = {k: float(np.abs(engines[k](batch) - ref).max()) for k in engines if k != "dygraph"}
        speeds = time_interleaved(engines, batch, warmup, iters)
        speeds["auto_engine"] = chosen.engine_for(bs)
        rows.append((arch, bs, speeds, diffs))
        print(f"{arch} bs{bs}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()
                                             if k != "auto_engine") + f" (auto: {speeds['auto_engine']})",
              flush=True)
    return rows


def markdown(rows, args, threads):
    head = [
        "# Inference speed (images/s, CPU)", "",
        f"Generated by `python benchmarks/inference_speed.py --models {' '.join(args.models)} "
        f"--iters {args.iters}` on {time.strftime('%Y-%m-%d')}: {ppcls_ft.CPU_VENDOR} CPU "
        f"({platform.processor() or platform.machine()}, {cpu_simd()}), {threads} threads, "
        f"paddle {paddle.__version__}, input {args.image_size}x{args.image_size}, random weights, "
        f"{args.warmup} warm-up + {args.iters} timed iterations per engine in 5 interleaved rounds "
        "(median of the rounds), preprocessing excluded.", "",
        *(["**Smoke run**: too few iterations for reliable numbers; rerun with the defaults.", ""]
          if args.iters < 10 else []),
        "Max diff: the largest |probability - dygraph probability| of that engine on the timed batch "
        "(exact = within the export certificate's 1e-4).", "",
        "Default: `Predictor(model_dir)` (engine `auto`), which serves with the engine the export "
        "certified and timed fastest for that batch size (ppcls_ft/runtimes.py); the export's own "
        "timing is short, so on a close call it can pick the other engine.", "",
        "| model | batch | default (engine) | oneDNN | no oneDNN | OpenVINO (bundled) | ONNX Runtime "
        "| dygraph eval | default / dygraph | max diff oneDNN / native / OpenVINO / ONNX Runtime |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def cell(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    body = [f"| {m} | {bs} | {s['auto']:.1f} ({s['auto_engine']}) | {s['onednn']:.1f} | "
            f"{s['native']:.1f} | {s['openvino']:.1f} | "
            f"{cell(s.get('onnxruntime'), '.1f')} | {s['dygraph']:.1f} | "
            f"{s['auto'] / s['dygraph']:.1f}x | {d['onednn']:.1e} / {d['native']:.1e} / "
            f"{d['openvino']:.1e} / {cell(d.get('onnxruntime'), '.1e')} |" for m, bs, s, d in rows]
    return "\n".join(head + body) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="paddle-inference vs dygraph speed on CPU")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="default: every available core")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "inference_speed.md"))
    args = parser.parse_args(argv)
    threads = args.threads or available_cores()
    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(threads)  # dygraph uses one thread otherwise (PERFORMANCE.md §1)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows += bench_model(name, args.image_size, threads, args.warmup, args.iters, workdir)
    table = markdown(rows, args, threads)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
