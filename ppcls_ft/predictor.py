"""paddle-inference Predictor for a model exported by ``engine/export.py`` (or by PaddleClas).

Both deploy/python/predict_cls.py and user code serve models through this one class, so the
served model predicts what the trained model predicted:

- preprocessing comes from the ``inference.yml`` written beside the model and is built with
  ``ppcls_ft.data.transforms.build_transforms``, the same function train and eval use
  (PaddleClas's deploy/ re-implements the transforms, and "predictions differ after export" is its
  users' top complaint);
- both model formats load: ``inference.json`` (Paddle 3, PIR) and ``inference.pdmodel`` (Paddle 2
  programs, still written by Paddle 3.3.1 when ``FLAGS_enable_pir_api=0``);
- the CPU fast path is on by default: oneDNN, every core, IR optimisation
  (shared/guide/PERFORMANCE.md §5: ResNet50 bs8 32.6 images/s vs 10.0 in dygraph).
"""
from pathlib import Path

import numpy as np
import yaml

from .errors import ConfigError, DataError

INFER_YML = "inference.yml"
# (model file, params file) in order of preference; Paddle 3 writes the first, Paddle 2 the second.
MODEL_FORMATS = (("inference.json", "inference.pdiparams"), ("inference.pdmodel", "inference.pdiparams"))
DEFAULT_DECODE = {"DecodeImage": {"to_rgb": True, "channel_first": False}}
PRECISIONS = ("fp32", "fp16")
# Paddle 3.3.1 CPU: with oneDNN on, this pass folds Swin's window_partition reshape (after a
# transpose) into the wrong shape, and create_predictor fails with "The input's second dimension
# and weight's first dimension is expected to be the same ... input's second dimension is 37632"
# (SwinTransformer_tiny at 224: (56/7)*7*7*96). Deleting it alone fixes Swin. For PPLCNet_x1_0,
# ResNet50 and MobileNetV2 (bs8, 224) outputs were bit-identical with and without it and the speed
# difference was within noise; tests/test_export.py serves every family with oneDNN on.
ONEDNN_BROKEN_PASSES = ("operator_reshape_onednn_fuse_pass",)


def find_model_files(model_dir, prefer=None):
    """Return ``(model_file, params_file)`` inside ``model_dir``; ``prefer`` names the model file."""
    model_dir = Path(model_dir)
    where = "Global.inference_model_dir"
    if not model_dir.is_dir():
        raise ConfigError(where, f"{str(model_dir)!r} is not a directory; point it at the folder "
                                 "written by tools/export_model.py")
    found = [(model_dir / m, model_dir / p) for m, p in MODEL_FORMATS if (model_dir / m).is_file()]
    if not found:
        raise ConfigError(where, f"{str(model_dir)!r} holds neither inference.json (Paddle 3) nor "
                                 "inference.pdmodel (Paddle 2); export the model with tools/export_model.py")
    if prefer:
        found.sort(key=lambda pair: pair[0].name != prefer)
    model_file, params_file = found[0]
    if not params_file.is_file():
        raise ConfigError(where, f"{str(model_dir)!r} has {model_file.name} but no {params_file.name}; "
                                 "copy both files of the export")
    return model_file, params_file


def read_inference_yml(model_dir):
    """The ``inference.yml`` beside the model as a dict, or ``{}`` when there is none."""
    path = Path(model_dir) / INFER_YML
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a YAML mapping (Global, PreProcess, PostProcess)")
    return data


def read_label_file(path, class_num, where):
    """``id name`` per line (PaddleClas class_id_map_file) -> list of names indexed by id."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(where, f"label file {str(path)!r} does not exist; fix the path or set it to null")
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        head, _, name = line.strip().partition(" ")
        if not head.isdigit():
            raise ConfigError(where, f"{path}:{lineno}: expected '<class id> <name>', got {line!r}")
        names[int(head)] = name.strip() or head
    if class_num is not None and (len(names) != class_num or max(names, default=-1) >= class_num):
        raise ConfigError(where, f"{path} has {len(names)} labels (ids up to {max(names, default=-1)}) "
                                 f"but the model has class_num={class_num}; use the label list of this dataset")
    return [names.get(i, str(i)) for i in range(class_num if class_num is not None else max(names) + 1)]


def _op_name(op):
    return next(iter(op)) if isinstance(op, dict) and op else str(op)


def split_preprocess(ops):
    """Split an op list into (decode op list, remaining ops, output is CHW).

    The decode step is separated so that already-decoded arrays skip it; a list without
    ``DecodeImage`` gets PaddleClas's default (cv2, RGB). Without ``ToCHWImage`` the transforms end
    in HWC and the predictor transposes.
    """
    ops = [op if isinstance(op, dict) else {op: None} for op in ops]
    decode = [op for op in ops if _op_name(op) == "DecodeImage"][:1] or [DEFAULT_DECODE]
    rest = [op for op in ops if _op_name(op) != "DecodeImage"]
    return decode, rest, any(_op_name(op) == "ToCHWImage" for op in rest)


class Predictor:
    """Serve an exported classifier: ``predict(images)`` and ``predict_arrays(batch)``.

    ``images`` are file paths, encoded bytes, or decoded HWC uint8 arrays in the colour order the
    model's ``DecodeImage`` produces (RGB for PaddleClas configs).
    """

    def __init__(self, model_dir, *, device="cpu", enable_mkldnn=True, cpu_threads=None,
                 use_tensorrt=False, precision="fp32", gpu_mem=500, gpu_id=0, batch_size=8,
                 topk=None, preprocess_ops=None, label_names=None):
        from .data.transforms import build_transforms

        self.model_dir = Path(model_dir)
        self.info = read_inference_yml(self.model_dir)
        glob = self.info.get("Global") or {}
        self.model_file, self.params_file = find_model_files(self.model_dir, glob.get("model_file"))
        self.image_shape = glob.get("image_shape")
        if int(batch_size) < 1:
            raise ConfigError("Global.batch_size", f"must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        ops = preprocess_ops if preprocess_ops is not None else (self.info.get("PreProcess") or {}).get("transform_ops")
        if not ops:
            raise ConfigError("PreProcess.transform_ops", f"{str(self.model_dir)!r} has no {INFER_YML} with "
                              "preprocessing (not exported by ppcls_ft); give the eval transform_ops in "
                              "the deploy config's PreProcess.transform_ops")
        decode, rest, self._chw = split_preprocess(ops)
        self.preprocess_ops = decode + rest
        self._decode = build_transforms(decode, "PreProcess.transform_ops")
        self._transform = build_transforms(rest, "PreProcess.transform_ops") if rest else None
        post = (self.info.get("PostProcess") or {}).get("Topk") or {}
        self.topk = int(topk or post.get("topk") or 5)
        self.label_names = list(label_names) if label_names is not None else post.get("label_list")
        self.predictor = self._create(device, enable_mkldnn, cpu_threads, use_tensorrt, precision,
                                      gpu_mem, gpu_id)
        self.input_name = self.predictor.get_input_names()[0]
        self.output_name = self.predictor.get_output_names()[0]

    def _create(self, device, enable_mkldnn, cpu_threads, use_tensorrt, precision, gpu_mem, gpu_id):
        import paddle.inference as pi

        config = pi.Config(str(self.model_file), str(self.params_file))
        device = str(device).lower()
        if precision not in PRECISIONS:
            raise ConfigError("Global.use_fp16", f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device.startswith("gpu"):
            self._configure_gpu(config, pi, use_tensorrt, precision, gpu_mem, gpu_id)
        elif device == "cpu":
            self._configure_cpu(config, enable_mkldnn, cpu_threads)
        else:
            raise ConfigError("Global.use_gpu", f"device must be 'cpu' or 'gpu', got {device!r}")
        config.switch_ir_optim(True)
        # No config.enable_memory_optim(): PaddleClas always calls it, and on Paddle 3.3.1 CPU it makes
        # create_predictor fail with "Not find predictor_id 0 and pass_name memory_optimize_pass"
        # (shared/guide/PADDLECLAS_COMPAT.md §8; reproduced here on a 2-layer model).
        config.disable_glog_info()
        return pi.create_predictor(config)

    @staticmethod
    def _configure_cpu(config, enable_mkldnn, cpu_threads):
        from .utils.device import available_cores

        config.disable_gpu()
        if enable_mkldnn:
            config.enable_mkldnn()
            # oneDNN caches kernels per input shape; a bound keeps memory flat when batch sizes vary.
            config.set_mkldnn_cache_capacity(10)
            for name in ONEDNN_BROKEN_PASSES:
                config.delete_pass(name)
        else:
            config.disable_mkldnn()
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
        if self.image_shape:  # the batch axis is dynamic ([None] + image_shape), so TensorRT needs a range
            shape = list(self.image_shape)
            config.set_trt_dynamic_shape_info({self.input_name_hint: [1] + shape},
                                              {self.input_name_hint: [self.batch_size] + shape},
                                              {self.input_name_hint: [self.batch_size] + shape})

    @property
    def input_name_hint(self):
        """Input name before the predictor exists: the export names it ``x``."""
        return (self.info.get("Global") or {}).get("input_name", "x")

    def preprocess(self, image):
        """One image (path, bytes or decoded HWC array) -> float32 CHW array."""
        name = None
        if isinstance(image, (str, Path)):
            name = str(image)
            try:
                image = Path(image).read_bytes()
            except OSError as exc:
                raise DataError(f"{name}: cannot read the image ({exc})") from None
        if isinstance(image, (bytes, bytearray)):
            try:
                image = self._decode(bytes(image))
            except DataError as exc:  # corrupt, or above DecodeImage.max_pixels: say which file
                raise DataError(f"{name or 'image bytes'}: {exc}") from None
            if image is None:
                raise DataError(f"{name or 'image bytes'}: not a decodable image")
        elif not isinstance(image, np.ndarray):
            raise DataError(f"expected a path, bytes or a numpy array, got {type(image).__name__}")
        out = self._transform(image) if self._transform is not None else image
        out = np.asarray(out, dtype=np.float32)
        if not self._chw and out.ndim == 3:
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    def predict_arrays(self, batch_chw):
        """Float32 ``[N, C, H, W]`` -> softmax probabilities ``[N, class_num]`` (runs in batch_size chunks)."""
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

    def postprocess(self, probs, file_names=None):
        """Top-k per row, PaddleClas result layout: class_ids, scores, label_names (+ file_name)."""
        return topk_results(probs, self.topk, self.label_names, file_names)

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
            results.extend(self.postprocess(self.predict_arrays(batch), names))
        return results


# ------------------------------------------------------------------ deploy/python/predict_cls.py

# deploy/configs/inference_cls.yaml schema: key -> accepted types (None: may be null).
DEPLOY_SCHEMA = {
    "Global": {"infer_imgs": (str, list), "inference_model_dir": (str,), "batch_size": (int,),
               "use_gpu": (bool,), "gpu_id": (int,), "enable_mkldnn": (bool,),
               "cpu_num_threads": (int, None), "use_tensorrt": (bool,), "use_fp16": (bool,),
               "gpu_mem": (int,), "save_path": (str, None)},
    "PreProcess": {"transform_ops": (list,)},
    "PostProcess": {"name": (str,), "topk": (int,), "class_id_map_file": (str, None)},
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
                     preprocess_ops=(cfg.get("PreProcess") or {}).get("transform_ops"),
                     label_names=labels)


def list_images(infer_imgs, where="Global.infer_imgs"):
    """A file, a directory (its images and those of its sub-folders, sorted) or a list -> paths."""
    items = infer_imgs if isinstance(infer_imgs, list) else [infer_imgs]
    paths = []
    for item in items:
        p = Path(str(item))
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(str(p))
        else:
            raise ConfigError(where, f"{str(p)!r} is neither an image file nor a directory")
    if not paths:
        raise ConfigError(where, f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {infer_imgs!r}")
    return paths


def topk_results(probs, topk, label_names=None, file_names=None):
    """Top-k per row of ``probs`` [N, K] in PaddleClas's result layout: class_ids, scores,
    label_names (empty without names), file_name when given. Ties go to the lower class id."""
    results = []
    k = min(int(topk), probs.shape[1])
    for i, row in enumerate(probs):
        ids = np.argsort(-row, kind="stable")[:k]
        res = {"class_ids": [int(c) for c in ids], "scores": [float(row[c]) for c in ids],
               "label_names": [str(label_names[c]) if c < len(label_names) else str(c) for c in ids]
               if label_names else []}
        if file_names is not None and file_names[i] is not None:
            res["file_name"] = file_names[i]
        results.append(res)
    return results


def format_result(res):
    """One PaddleClas-style line: ``name.jpg:\\tclass id(s): [..], score(s): [..], label_name(s): [..]``."""
    name = Path(res.get("file_name", "image")).name
    scores = [round(s, 5) for s in res["scores"]]
    return (f"{name}:\tclass id(s): {res['class_ids']}, score(s): {scores}, "
            f"label_name(s): {res['label_names']}")


def run_deploy(cfg, print_fn=print):
    """Classify ``Global.infer_imgs``, print one line per image, write JSON to ``Global.save_path``."""
    import json

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
