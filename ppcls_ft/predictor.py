"""paddle-inference Predictor for a model exported by ``engine/export.py`` (or by PaddleClas).

deploy/python/predict_cls.py, the HTTP service (deploy/serve.py) and user code serve models
through this one class, so the served model predicts what the trained model predicted. The
exported format (file names, ``inference.yml``, pre- and post-processing) belongs to
``inference_format.py``; this file only runs the graph:

- both model formats load: ``inference.json`` (Paddle 3, PIR) and ``inference.pdmodel`` (Paddle 2
  programs, still written by Paddle 3.3.1 when ``FLAGS_enable_pir_api=0``);
- the CPU fast path is on by default: oneDNN, every core, IR optimisation
  (shared/guide/PERFORMANCE.md §5: ResNet50 bs8 32.6 images/s vs 10.0 in dygraph).
"""
import dataclasses
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .inference_format import (INFER_YML, InferenceSpec, Postprocessor, Preprocessor,
                               find_model_files, format_result, read_label_file, read_spec)

PRECISIONS = ("fp32", "fp16")
# CPU engines of paddle-inference. oneDNN is the default: docs/benchmarks/inference_speed.md
# measured Paddle's bundled OpenVINO (Config.enable_openvino_engine) no faster and equally exact.
CPU_ENGINES = ("onednn", "native", "openvino")
# Paddle 3.3.1 CPU: with oneDNN on, this pass folds Swin's window_partition reshape (after a
# transpose) into the wrong shape, and create_predictor fails with "The input's second dimension
# and weight's first dimension is expected to be the same ... input's second dimension is 37632"
# (SwinTransformer_tiny at 224: (56/7)*7*7*96). Deleting it alone fixes Swin. For PPLCNet_x1_0,
# ResNet50 and MobileNetV2 (bs8, 224) outputs were bit-identical with and without it and the speed
# difference was within noise; tests/test_export.py serves every family with oneDNN on.
ONEDNN_BROKEN_PASSES = ("operator_reshape_onednn_fuse_pass",)


class Predictor:
    """Serve an exported classifier: ``predict(images)`` and ``predict_arrays(batch)``.

    ``images`` are file paths, encoded bytes, or decoded HWC uint8 arrays in the colour order the
    model's ``DecodeImage`` produces (RGB for PaddleClas configs).
    """

    def __init__(self, model_dir, *, device="cpu", enable_mkldnn=True, cpu_threads=None,
                 use_tensorrt=False, precision="fp32", gpu_mem=500, gpu_id=0, batch_size=8,
                 topk=None, preprocess_ops=None, label_names=None, reject_threshold=None,
                 engine=None):
        self.model_dir = Path(model_dir)
        # No inference.yml: a PaddleClas export, served with the caller's preprocessing.
        spec = read_spec(self.model_dir) or InferenceSpec(transform_ops=None)
        self.model_file, self.params_file = find_model_files(self.model_dir, spec.model_file)
        if preprocess_ops is not None:
            spec = dataclasses.replace(spec, transform_ops=preprocess_ops)
        if not spec.transform_ops:
            raise ConfigError("PreProcess.transform_ops", f"{str(self.model_dir)!r} has no {INFER_YML} with "
                              "preprocessing (not exported by ppcls_ft); give the eval transform_ops in "
                              "the deploy config's PreProcess.transform_ops")
        self.spec = spec
        if int(batch_size) < 1:
            raise ConfigError("Global.batch_size", f"must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.preprocess = Preprocessor(spec.transform_ops)
        self.postprocess = Postprocessor.from_spec(spec, topk, label_names, reject_threshold)
        engine = engine or ("onednn" if enable_mkldnn else "native")
        if engine not in CPU_ENGINES:
            raise ConfigError("engine", f"must be one of {', '.join(CPU_ENGINES)}, got {engine!r}")
        self.engine = engine
        self.predictor = self._create(device, engine, cpu_threads, use_tensorrt, precision,
                                      gpu_mem, gpu_id)
        self.input_name = self.predictor.get_input_names()[0]
        self.output_name = self.predictor.get_output_names()[0]

    def _create(self, device, engine, cpu_threads, use_tensorrt, precision, gpu_mem, gpu_id):
        import paddle.inference as pi

        config = pi.Config(str(self.model_file), str(self.params_file))
        device = str(device).lower()
        if precision not in PRECISIONS:
            raise ConfigError("Global.use_fp16", f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device.startswith("gpu"):
            self._configure_gpu(config, pi, use_tensorrt, precision, gpu_mem, gpu_id)
        elif device == "cpu":
            self._configure_cpu(config, pi, engine, cpu_threads)
        else:
            raise ConfigError("Global.use_gpu", f"device must be 'cpu' or 'gpu', got {device!r}")
        config.switch_ir_optim(True)
        # No config.enable_memory_optim(): PaddleClas always calls it, and on Paddle 3.3.1 CPU it makes
        # create_predictor fail with "Not find predictor_id 0 and pass_name memory_optimize_pass"
        # (shared/guide/PADDLECLAS_COMPAT.md §8; reproduced here on a 2-layer model).
        config.disable_glog_info()
        return pi.create_predictor(config)

    @staticmethod
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

    def _configure_gpu(self, config, pi, use_tensorrt, precision, gpu_mem, gpu_id):
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
        config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=self.batch_size,
                                      min_subgraph_size=30, precision_mode=mode, use_static=False,
                                      use_calib_mode=False)
        if self.spec.image_shape:  # the batch axis is dynamic ([None] + image_shape), so TensorRT needs a range
            shape, name = list(self.spec.image_shape), self.spec.input_name
            config.set_trt_dynamic_shape_info({name: [1] + shape}, {name: [self.batch_size] + shape},
                                              {name: [self.batch_size] + shape})

    def run_graph(self, batch_chw):
        """Float32 ``[N, C, H, W]`` -> the graph's softmax ``[N, class_num]``, uncalibrated (runs in
        batch_size chunks). The export certificate compares this with dygraph."""
        batch = np.ascontiguousarray(np.asarray(batch_chw, dtype=np.float32))
        if batch.ndim != 4:
            raise DataError(f"predict_arrays expects [N, C, H, W], got shape {list(batch.shape)}")
        inp = self.predictor.get_input_handle(self.input_name)
        out = self.predictor.get_output_handle(self.output_name)
        chunks = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            inp.reshape(list(chunk.shape))
            inp.copy_from_cpu(chunk)
            self.predictor.run()
            chunks.append(out.copy_to_cpu())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def predict_arrays(self, batch_chw):
        """Float32 ``[N, C, H, W]`` -> probabilities ``[N, class_num]``, calibrated by the
        ``inference.yml`` temperature (equal to ``run_graph`` when there is none)."""
        return self.postprocess.probabilities(self.run_graph(batch_chw))

    def predict(self, images):
        """Classify one image or a list; returns one result dict per image, in order."""
        if isinstance(images, (str, Path, bytes, bytearray, np.ndarray)):
            images = [images]
        results = []
        images = list(images)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = np.stack([self.preprocess(img) for img in chunk])
            names = [str(img) if isinstance(img, (str, Path)) else None for img in chunk]
            results.extend(self.postprocess(self.run_graph(batch), names))
        return results


# ------------------------------------------------------------------ deploy/python/predict_cls.py

# deploy/configs/inference_cls.yaml schema: key -> accepted types (None: may be null).
DEPLOY_SCHEMA = {
    "Global": {"infer_imgs": (str, list), "inference_model_dir": (str,), "batch_size": (int,),
               "use_gpu": (bool,), "gpu_id": (int,), "enable_mkldnn": (bool,),
               "cpu_num_threads": (int, None), "use_tensorrt": (bool,), "use_fp16": (bool,),
               "gpu_mem": (int,), "save_path": (str, None)},
    "PreProcess": {"transform_ops": (list,)},
    "PostProcess": {"name": (str,), "topk": (int,), "class_id_map_file": (str, None),
                    "reject_threshold": (float, int, None)},
}


def load_deploy_config(path, overrides=None):
    """Read the deploy YAML, apply ``-o`` overrides (parsed as YAML, never eval'd), check its keys."""
    from .config import apply_overrides, check_schema, read_yaml

    cfg = apply_overrides(read_yaml(path), overrides)
    for section in cfg:
        if section not in DEPLOY_SCHEMA:
            from .registry import closest
            raise ConfigError(section, f"unknown section{closest(section, DEPLOY_SCHEMA)}; "
                                       f"valid: {', '.join(DEPLOY_SCHEMA)}")
        check_schema(cfg[section], DEPLOY_SCHEMA[section], section)
    if not (cfg.get("Global") or {}).get("inference_model_dir"):
        raise ConfigError("Global.inference_model_dir", "set it to the exported model's directory")
    return cfg


def predictor_from_config(cfg):
    """Build a ``Predictor`` from a deploy config (see deploy/configs/inference_cls.yaml)."""
    glob = cfg.get("Global") or {}
    post = cfg.get("PostProcess") or {}
    labels = None
    if post.get("class_id_map_file"):
        labels = read_label_file(post["class_id_map_file"], None, "PostProcess.class_id_map_file")
    return Predictor(glob["inference_model_dir"], device="gpu" if glob.get("use_gpu") else "cpu",
                     enable_mkldnn=glob.get("enable_mkldnn", True), cpu_threads=glob.get("cpu_num_threads"),
                     use_tensorrt=glob.get("use_tensorrt", False),
                     precision="fp16" if glob.get("use_fp16") else "fp32",
                     gpu_mem=glob.get("gpu_mem", 500), gpu_id=glob.get("gpu_id", 0),
                     batch_size=glob.get("batch_size", 1), topk=post.get("topk"),
                     reject_threshold=post.get("reject_threshold"),
                     preprocess_ops=(cfg.get("PreProcess") or {}).get("transform_ops"),
                     label_names=labels)


def run_deploy(cfg, print_fn=print):
    """Classify ``Global.infer_imgs``, print one line per image, write JSON to ``Global.save_path``."""
    import json

    from .data.dataset import list_images

    glob = cfg.get("Global") or {}
    predictor = predictor_from_config(cfg)
    images = list_images(glob.get("infer_imgs"))
    results = []
    for start in range(0, len(images), predictor.batch_size):
        for res in predictor.predict(images[start:start + predictor.batch_size]):
            print_fn(format_result(res))
            results.append(res)
    if glob.get("save_path"):
        out = Path(glob["save_path"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        print_fn(f"saved {len(results)} results to {out}")
    return results
