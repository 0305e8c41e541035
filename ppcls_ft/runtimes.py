"""The engines that run an exported graph, and the choice of the fastest exact one.

Every runner takes a float32 ``[N, C, H, W]`` batch and returns the graph's softmax ``[N, K]``:

- ``onednn``, ``native``, ``openvino``: paddle-inference on the CPU (``inference.json``), with
  oneDNN, without it, or with Paddle's bundled OpenVINO engine; ``gpu``: paddle-inference on CUDA,
  optionally with TensorRT;
- ``onnxruntime``: ONNX Runtime on ``inference.onnx``, which the export writes with paddle2onnx
  when it is installed (the ``[cpu]`` extra installs it).

Which CPU engine is fastest depends on the model and the batch size, and none is fastest
everywhere (docs/benchmarks/inference_speed.md: ONNX Runtime is 1.9-2.1x oneDNN for PPLCNet and
MobileNetV2 at batch 1, oneDNN wins MobileNetV2 at batch 8, they tie on ResNet50). So the export
certifies every engine it wrote a graph for against the dygraph model (``engine/certify.py``),
times the certified ones at batch 1 and at the serving batch on the machine it runs on
(``time_engines``), and records the winners in ``inference.yml``'s ``Engine`` section;
``Predictor(engine="auto")``, the default, serves each call with the recorded winner for the
nearest batch size (``EnginePlan``).
"""
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError

ONNX_FILE = "inference.onnx"
DEFAULT_ENGINE = "onednn"  # what serves an export without an Engine record, and what always certifies
ONNX_ENGINE = "onnxruntime"
PADDLE_CPU_ENGINES = ("onednn", "native", "openvino")
CPU_ENGINES = PADDLE_CPU_ENGINES + (ONNX_ENGINE,)
ENGINE_CHOICES = ("auto",) + CPU_ENGINES
ENGINE_TITLES = {"onednn": "paddle-inference CPU, oneDNN on", "native": "paddle-inference CPU, no oneDNN",
                 "openvino": "paddle-inference CPU, bundled OpenVINO", ONNX_ENGINE: "ONNX Runtime CPU"}
PRECISIONS = ("fp32", "fp16")
# Another engine replaces oneDNN (the engine paddle-inference users know) only when it is this
# much faster: timings on a busy machine wobble by a few per cent, and a coin flip between two
# equally fast engines would make exports differ for no gain.
MIN_SPEEDUP = 1.05
# Paddle 3.3.1 CPU: with oneDNN on, this pass folds Swin's window_partition reshape (after a
# transpose) into the wrong shape, and create_predictor fails with "The input's second dimension
# and weight's first dimension is expected to be the same ... input's second dimension is 37632"
# (SwinTransformer_tiny at 224: (56/7)*7*7*96). Deleting it alone fixes Swin. For PPLCNet_x1_0,
# ResNet50 and MobileNetV2 (bs8, 224) outputs were bit-identical with and without it and the speed
# difference was within noise; tests/test_export.py serves every family with oneDNN on.
ONEDNN_BROKEN_PASSES = ("operator_reshape_onednn_fuse_pass",)


def onnxruntime_available():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class PaddleRunner:
    """paddle-inference on ``model_file``/``params_file`` (CPU engines or GPU)."""

    def __init__(self, model_file, params_file, engine="onednn", *, device="cpu", cpu_threads=None,
                 use_tensorrt=False, precision="fp32", gpu_mem=500, gpu_id=0, max_batch=8,
                 trt_shape=None):
        import paddle.inference as pi

        if precision not in PRECISIONS:
            raise ConfigError("Global.use_fp16", f"precision must be one of {PRECISIONS}, got {precision!r}")
        config = pi.Config(str(model_file), str(params_file))
        device = str(device).lower()
        if device.startswith("gpu"):
            self.name = "gpu-tensorrt" if use_tensorrt else "gpu"
            _configure_gpu(config, pi, use_tensorrt, precision, gpu_mem, gpu_id, max_batch, trt_shape)
        elif device == "cpu":
            self.name = engine
            _configure_cpu(config, pi, engine, cpu_threads)
        else:
            raise ConfigError("Global.use_gpu", f"device must be 'cpu' or 'gpu', got {device!r}")
        config.switch_ir_optim(True)
        # No config.enable_memory_optim(): PaddleClas always calls it, and on Paddle 3.3.1 CPU it makes
        # create_predictor fail with "Not find predictor_id 0 and pass_name memory_optimize_pass"
        # (shared/guide/PADDLECLAS_COMPAT.md §8; reproduced here on a 2-layer model).
        config.disable_glog_info()
        self.predictor = pi.create_predictor(config)
        self._inp = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._out = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def __call__(self, batch):
        self._inp.reshape(list(batch.shape))
        self._inp.copy_from_cpu(batch)
        self.predictor.run()
        return self._out.copy_to_cpu()


def _configure_cpu(config, pi, engine, cpu_threads):
    from .utils.device import available_cores

    config.disable_gpu()
    if engine == "native":
        config.disable_mkldnn()
    else:
        if engine == "openvino":
            # Paddle 3.3.1 turns oneDNN on with it (Config.summary() says enable_mkldnn: true)
            # and still runs its oneDNN passes on a PIR program, so the Swin fix below applies.
            config.enable_openvino_engine(pi.PrecisionType.Float32)
        config.enable_mkldnn()
        # oneDNN caches kernels per input shape; a bound keeps memory flat when batch sizes vary.
        config.set_mkldnn_cache_capacity(10)
        for name in ONEDNN_BROKEN_PASSES:
            config.delete_pass(name)
    # Paddle defaults to one math thread (PERFORMANCE.md §1); use every core we may run on.
    config.set_cpu_math_library_num_threads(int(cpu_threads or available_cores()))


def _configure_gpu(config, pi, use_tensorrt, precision, gpu_mem, gpu_id, max_batch, trt_shape):
    import paddle

    if not paddle.device.is_compiled_with_cuda():
        raise ConfigError("Global.use_gpu", "this Paddle build has no CUDA; set use_gpu: False "
                                            "or install paddlepaddle-gpu")
    half = precision == "fp16"
    mode = pi.PrecisionType.Half if half else pi.PrecisionType.Float32
    if not use_tensorrt:
        config.enable_use_gpu(int(gpu_mem), int(gpu_id), mode)
        return
    config.enable_use_gpu(int(gpu_mem), int(gpu_id))
    # 30: PaddleClas's minimum subgraph size; smaller TensorRT islands cost more than they gain.
    # use_calib_mode=False: calibration only applies to int8, which is not offered here.
    config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=max_batch,
                                  min_subgraph_size=30, precision_mode=mode, use_static=False,
                                  use_calib_mode=False)
    if trt_shape:  # the batch axis is dynamic ([None] + image_shape), so TensorRT needs a range
        name, shape = trt_shape
        config.set_trt_dynamic_shape_info({name: [1] + shape}, {name: [max_batch] + shape},
                                          {name: [max_batch] + shape})


class OnnxRunner:
    """ONNX Runtime (CPU) on ``inference.onnx``."""

    name = "onnxruntime"

    def __init__(self, onnx_file, cpu_threads=None):
        from .utils.device import available_cores

        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("Global.engine", "onnxruntime is not installed: pip install onnxruntime "
                              "(the [cpu] extra has it), or choose engine onednn") from None
        if not Path(onnx_file).is_file():
            raise ConfigError("Global.engine", f"{str(onnx_file)!r} does not exist: the model was "
                              "exported without paddle2onnx; export it again with "
                              "Global.export_onnx=True, or choose engine onednn")
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = int(cpu_threads or available_cores())
        opts.inter_op_num_threads = 1  # one graph at a time; the intra-op pool uses every core
        opts.log_severity_level = 3    # errors only: its warnings about unused initialisers are noise
        self.session = onnxruntime.InferenceSession(str(onnx_file), opts,
                                                    providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def __call__(self, batch):
        return self.session.run(None, {self._input: batch})[0]


def make_runner(model_dir, model_file, params_file, engine, **kw):
    """A runner for one concrete engine name of ``CPU_ENGINES`` (or ``gpu``)."""
    if engine == ONNX_ENGINE:
        return OnnxRunner(Path(model_dir) / ONNX_FILE, kw.get("cpu_threads"))
    return PaddleRunner(model_file, params_file, engine, **kw)


# ------------------------------------------------------------------------------ choosing


class EnginePlan:
    """Which engine serves a call of ``n`` images: ``{batch size: engine}``; the entry of the
    smallest recorded size at or above ``n`` serves it, else the largest's. (The export records
    batch 1 and the serving batch, so a call of 2 goes to the serving batch's winner.)"""

    def __init__(self, by_batch):
        self.by_batch = {int(k): str(v) for k, v in by_batch.items()}
        if not self.by_batch:
            raise ValueError("an engine plan needs at least one entry")

    @classmethod
    def single(cls, engine):
        return cls({1: engine})

    @property
    def engines(self):
        return sorted(set(self.by_batch.values()))

    def engine_for(self, n):
        sizes = sorted(self.by_batch)
        size = next((s for s in sizes if s >= n), sizes[-1])
        return self.by_batch[size]

    def describe(self):
        if len(self.engines) == 1:
            return self.engines[0]
        return ", ".join(f"{e} at batch {s}" for s, e in sorted(self.by_batch.items()))


def plan_from_spec(spec, model_dir):
    """The ``auto`` plan on the CPU: the ``Engine.fastest`` record of ``inference.yml``, with an
    engine this machine cannot run (no onnxruntime, no ``inference.onnx``) replaced by oneDNN;
    oneDNN when the export recorded nothing (older exports, PaddleClas exports)."""
    record = (getattr(spec, "engines", None) or {}).get("fastest") or {}
    usable = set(PADDLE_CPU_ENGINES)
    if onnxruntime_available() and (Path(model_dir) / ONNX_FILE).is_file():
        usable.add(ONNX_ENGINE)
    plan = {int(bs): (engine if engine in usable else DEFAULT_ENGINE) for bs, engine in record.items()}
    return EnginePlan(plan or {1: DEFAULT_ENGINE})


def time_engines(runners, image_shape, batch_sizes, budget_s=0.4, rounds=3, seed=0):
    """Images/s of each runner at each batch size: ``{engine: {batch: rate}}``.

    Interleaved (each round times every engine in turn, so a burst of load elsewhere slows all of
    them alike) and the best round kept (the least disturbed one). Each engine gets about
    ``budget_s`` per batch size, and at least one timed call per round after one warm-up call.
    """
    rng = np.random.default_rng(seed)
    rates = {name: {} for name in runners}
    for bs in batch_sizes:
        batch = rng.standard_normal([int(bs)] + list(image_shape)).astype(np.float32)
        for run in runners.values():
            run(batch)  # warm-up: oneDNN and ONNX Runtime build their kernels for a new shape here
        best = {name: 0.0 for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                calls, start = 0, time.perf_counter()
                while True:
                    run(batch)
                    calls += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= budget_s / rounds:
                        break
                best[name] = max(best[name], calls * int(bs) / elapsed)
        for name in runners:
            rates[name][int(bs)] = round(best[name], 2)
    return rates


def fastest(rates, default=DEFAULT_ENGINE):
    """``{batch: engine}`` from ``time_engines`` rates: the fastest engine, unless it beats
    ``default`` by less than ``MIN_SPEEDUP``."""
    choice = {}
    for bs in sorted({b for per in rates.values() for b in per}):
        at = {name: per[bs] for name, per in rates.items() if bs in per}
        winner = max(at, key=at.get)
        if default in at and at[winner] < MIN_SPEEDUP * at[default]:
            winner = default
        choice[bs] = winner
    return choice
