"""The Predictor for a model exported by ``engine/export.py`` (or by PaddleClas).

deploy/python/predict_cls.py, the HTTP service (deploy/serve.py) and user code serve models
through this one class, so the served model predicts what the trained model predicted. The
exported format (file names, ``inference.yml``, pre- and post-processing) belongs to
``inference_format.py``; this file only runs the graph:

- both model formats load: ``inference.json`` (Paddle 3, PIR) and ``inference.pdmodel`` (Paddle 2
  programs, still written by Paddle 3.3.1 when ``FLAGS_enable_pir_api=0``);
- the CPU fast path is on by default: the engine the export measured fastest among those it
  certified (``runtimes.py``: ONNX Runtime or paddle-inference with oneDNN), every core, IR
  optimisation (shared/guide/PERFORMANCE.md §5: ResNet50 bs8 32.6 images/s vs 10.0 in dygraph).
"""
import dataclasses
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .inference_format import (INFER_YML, InferenceSpec, Postprocessor, Preprocessor,
                               find_model_files, format_result, read_label_file, read_spec)

from .runtimes import ENGINE_CHOICES, EnginePlan, make_runner, plan_from_spec


class Predictor:
    """Serve an exported classifier: ``predict(images)`` and ``predict_arrays(batch)``.

    ``images`` are file paths, encoded bytes, or decoded HWC uint8 arrays in the colour order the
    model's ``DecodeImage`` produces (RGB for PaddleClas configs).

    ``engine`` (CPU): ``auto`` (default) serves each call with the engine the export certified and
    measured fastest for that batch size (``runtimes.py``; oneDNN for exports without that
    record), or one of ``onednn``, ``native``, ``openvino``, ``onnxruntime``. ``enable_mkldnn=False``
    means ``native``. ``self.engine`` says what serves.
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
        engine = engine or ("auto" if enable_mkldnn else "native")
        if engine not in ENGINE_CHOICES:
            raise ConfigError("Global.engine", f"must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
        device = str(device).lower()
        if device.startswith("gpu"):
            self.plan = EnginePlan.single("gpu")
        elif engine == "auto":
            self.plan = plan_from_spec(spec, self.model_dir)
        else:
            self.plan = EnginePlan.single(engine)
        trt_shape = (spec.input_name, list(spec.image_shape)) if spec.image_shape else None
        self.runners = {name: make_runner(self.model_dir, self.model_file, self.params_file, name,
                                          device=device, cpu_threads=cpu_threads,
                                          use_tensorrt=use_tensorrt, precision=precision,
                                          gpu_mem=gpu_mem, gpu_id=gpu_id, max_batch=self.batch_size,
                                          trt_shape=trt_shape)
                        for name in self.plan.engines}
        self.engine = self.plan.describe()

    def run_graph(self, batch_chw):
        """Float32 ``[N, C, H, W]`` -> the graph's softmax ``[N, class_num]``, uncalibrated (runs in
        batch_size chunks, each on the engine the plan gives for its size). The export certificate
        compares this with dygraph."""
        batch = np.ascontiguousarray(np.asarray(batch_chw, dtype=np.float32))
        if batch.ndim != 4:
            raise DataError(f"predict_arrays expects [N, C, H, W], got shape {list(batch.shape)}")
        chunks = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            chunks.append(self.runners[self.plan.engine_for(len(chunk))](chunk))
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
               "gpu_mem": (int,), "save_path": (str, None), "engine": (str, None)},
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
                     engine=glob.get("engine"),
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
