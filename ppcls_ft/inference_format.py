"""The exported-model format, in one place: file names, the versioned ``inference.yml``, label
lists, and the pre- and post-processing every reader applies.

``engine/export.py`` writes this format; ``predictor.Predictor``, the HTTP service
(``ppcls_ft/service.py``) and ``tools/infer.py`` read it through the classes here, so they cannot
drift apart (PaddleClas keeps a second copy of preprocessing in ``deploy/`` and its users' top
complaint is that predictions differ after export, shared/guide/PADDLECLAS_COMPAT.md §8).

``inference.yml`` layout (schema_version 2; the PaddleClas/PaddleX sections come first and are
unchanged, so those tools still read the file):

    Global:      schema_version, model_name (PaddleX's spelling), arch (PaddleClas's), class_num,
                 image_shape, input_name, output, model_file, params_file, ppcls_ft_version,
                 paddle_version [, onnx_file, ...]
    PreProcess:  transform_ops: the eval op list, ToCHWImage last, DecodeImage only if not default
    PostProcess: Topk: {topk, label_list}
    Calibration: temperature and its fit record, or absent (= temperature 1)
    Reject:      {threshold, class_id, label_name}, or absent (= never reject)
    Engine:      {certified, fastest: {batch: engine}, images_per_s, measured_on}: the CPU engines
                 the certificate passed and the export timed (runtimes.py), or absent (= oneDNN)

Files without ``schema_version`` (ppcls_ft before 0.2, PaddleX exports) are version 1: the first
three sections only, which read with temperature 1 and no reject threshold.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .errors import ConfigError, DataError

INFER_YML = "inference.yml"
CERTIFICATE_FILE = "export_certificate.json"
# (model file, params file) in order of preference; Paddle 3 writes the first, Paddle 2 the second.
MODEL_FORMATS = (("inference.json", "inference.pdiparams"), ("inference.pdmodel", "inference.pdiparams"))
# Everything an export writes; removed before a new export so a directory never holds two graphs
# or a certificate of another model.
EXPORT_FILES = ("inference.json", "inference.pdmodel", "inference.pdiparams",
                "inference.pdiparams.info", "inference.onnx", INFER_YML, CERTIFICATE_FILE)
SCHEMA_VERSION = 2
DEFAULT_DECODE = {"DecodeImage": {"to_rgb": True, "channel_first": False}}
DEFAULT_TOPK = 5
# A rejected image is answered with this id and name (top score below Reject.threshold).
UNKNOWN_ID = -1
UNKNOWN_LABEL = "unknown"


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


def read_label_file(path, class_num, where):
    """``id name`` per line (PaddleClas class_id_map_file) -> list of names indexed by id."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(where, f"label file {str(path)!r} does not exist; fix the path or set it to null")
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):  # BOM ok
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


def complete_preprocess(ops):
    """The op list as written to ``inference.yml``: ``ToCHWImage`` last, and ``DecodeImage`` only
    when it differs from the default (cv2, RGB, HWC), which every reader applies to a list without
    one. PaddleX decodes images itself and refuses a ``DecodeImage`` entry, so leaving the default
    out is what lets PaddleX load the directory."""
    import copy

    ops = [copy.deepcopy(op) if isinstance(op, dict) else {op: None} for op in ops]
    default = DEFAULT_DECODE["DecodeImage"]
    ops = [op for op in ops if not (_op_name(op) == "DecodeImage"
                                    and {**default, **(op["DecodeImage"] or {})} == default)]
    if "ToCHWImage" not in [_op_name(op) for op in ops]:
        ops.append({"ToCHWImage": None})
    return ops


def paddlex_model_name(arch):
    """PaddleX's name for a PaddleClas architecture: PaddleX loads a directory only when
    ``Global.model_name`` is one of its names (``create_model(model_name=..., model_dir=...)``
    refuses a mismatch). Its spellings differ from PaddleClas's in two ways for our families."""
    if arch is None:
        return None
    if arch == "MobileNetV2":
        return "MobileNetV2_x1_0"
    if arch.startswith("PPLCNet"):
        return "PP-LCNet" + arch[len("PPLCNet"):]
    return arch


# ------------------------------------------------------------------------------ inference.yml


@dataclass
class InferenceSpec:
    """What ``inference.yml`` says about an exported model (see the module docstring)."""

    transform_ops: list
    model_name: str = None        # the Arch name (PaddleClas spelling); written in PaddleX's as well
    class_num: int = None
    image_shape: list = None
    input_name: str = "x"
    model_file: str = None
    params_file: str = None
    topk: int = DEFAULT_TOPK
    label_list: list = None
    temperature: float = 1.0
    calibration: dict = None      # the fit record (ECE before/after, samples, ...) when calibrated
    reject_threshold: float = None
    engines: dict = None          # the Engine section: certified engines and the fastest per batch
    extra: dict = field(default_factory=dict)   # other Global keys (versions, onnx), kept as read
    schema_version: int = SCHEMA_VERSION

    def to_yaml_dict(self):
        glob = {"schema_version": SCHEMA_VERSION, "model_name": paddlex_model_name(self.model_name),
                "arch": self.model_name, "class_num": self.class_num, "image_shape": self.image_shape,
                "input_name": self.input_name, "output": "softmax probabilities",
                "model_file": self.model_file, "params_file": self.params_file, **self.extra}
        data = {"Global": glob,
                "PreProcess": {"transform_ops": complete_preprocess(self.transform_ops)},
                "PostProcess": {"Topk": {"topk": int(self.topk), "label_list":
                                         list(self.label_list) if self.label_list is not None else None}}}
        if self.temperature != 1.0 or self.calibration:
            data["Calibration"] = {"method": "temperature", "temperature": float(self.temperature),
                                   **(self.calibration or {})}
        if self.reject_threshold is not None:
            data["Reject"] = {"threshold": float(self.reject_threshold), "class_id": UNKNOWN_ID,
                              "label_name": UNKNOWN_LABEL}
        if self.engines:
            data["Engine"] = self.engines
        return data

    @classmethod
    def from_yaml_dict(cls, data, where=INFER_YML):
        if not isinstance(data, dict):
            raise ConfigError(where, "must be a YAML mapping (Global, PreProcess, PostProcess)")
        glob = dict(data.get("Global") or {})
        version = glob.pop("schema_version", 1)
        if not isinstance(version, int) or version < 1:
            raise ConfigError(f"{where}: Global.schema_version", f"must be a positive integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{where}: Global.schema_version",
                              f"is {version}, newer than this ppcls_ft reads ({SCHEMA_VERSION}); "
                              "upgrade ppcls_ft or export the model again with this version")
        topk = ((data.get("PostProcess") or {}).get("Topk")) or {}
        calib = dict(data.get("Calibration") or {})
        temperature = float(calib.pop("temperature", 1.0))
        calib.pop("method", None)
        if not temperature > 0:
            raise ConfigError(f"{where}: Calibration.temperature", f"must be > 0, got {temperature}")
        reject = (data.get("Reject") or {}).get("threshold")
        engines = data.get("Engine") or None
        if engines is not None and not (isinstance(engines, dict)
                                        and isinstance(engines.get("fastest", {}), dict)):
            raise ConfigError(f"{where}: Engine.fastest", "must map batch sizes to engine names, "
                              f"got {engines!r}; export the model again")
        known = ("model_name", "arch", "class_num", "image_shape", "input_name", "output",
                 "model_file", "params_file")
        return cls(transform_ops=(data.get("PreProcess") or {}).get("transform_ops"),
                   model_name=glob.get("arch", glob.get("model_name")), class_num=glob.get("class_num"),
                   image_shape=glob.get("image_shape"), input_name=glob.get("input_name", "x"),
                   model_file=glob.get("model_file"), params_file=glob.get("params_file"),
                   topk=int(topk.get("topk") or DEFAULT_TOPK), label_list=topk.get("label_list"),
                   temperature=temperature, calibration=calib or None,
                   reject_threshold=None if reject is None else float(reject), engines=engines,
                   extra={k: v for k, v in glob.items() if k not in known}, schema_version=version)


def read_spec(model_dir):
    """The ``InferenceSpec`` of ``model_dir``, or ``None`` when it has no ``inference.yml``."""
    path = Path(model_dir) / INFER_YML
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return InferenceSpec.from_yaml_dict(data, str(path))


def write_spec(model_dir, spec):
    """``inference.yml``, written atomically (a failed write never leaves half a file)."""
    from .utils.atomic_io import write_text_atomic
    write_text_atomic(Path(model_dir) / INFER_YML,
                      yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------------------ pre-processing


class Preprocessor:
    """One image (path, encoded bytes or decoded HWC array) -> float32 CHW, per an op list.

    The decode step is kept apart so already-decoded arrays skip it; a list without
    ``DecodeImage`` gets PaddleClas's default (cv2, RGB). The rest is built by
    ``data.transforms.build_transforms``, the function train and eval use.
    """

    def __init__(self, ops, where="PreProcess.transform_ops"):
        from .data.transforms import build_transforms

        ops = [op if isinstance(op, dict) else {op: None} for op in ops]
        decode = [op for op in ops if _op_name(op) == "DecodeImage"][:1] or [DEFAULT_DECODE]
        rest = [op for op in ops if _op_name(op) != "DecodeImage"]
        self.ops = decode + rest
        self._decode = build_transforms(decode, where)
        self._transform = build_transforms(rest, where)

    def decode(self, image, name=None):
        """Path or bytes -> decoded HWC array; arrays pass through."""
        if isinstance(image, (str, Path)):
            name = str(image)
            try:
                image = Path(image).read_bytes()
            except OSError as exc:
                raise DataError(f"{name}: cannot read the image ({exc})") from None
        if isinstance(image, (bytes, bytearray, memoryview)):
            try:
                return self._decode(bytes(image))
            except DataError as exc:
                raise DataError(f"{name}: {exc}" if name else str(exc)) from None
        if not isinstance(image, np.ndarray):
            raise DataError(f"expected a path, bytes or a numpy array, got {type(image).__name__}")
        return image

    def __call__(self, image):
        return self._transform.to_chw(self.decode(image))


# ------------------------------------------------------------------------------ post-processing


def apply_temperature(probs, temperature):
    """``softmax(logits / T)`` from ``softmax(logits)``: log p differs from the logits by a per-row
    constant, which softmax ignores. Float64 inside; T = 1 returns ``probs`` unchanged."""
    if temperature == 1.0:
        return probs
    with np.errstate(divide="ignore"):
        z = np.log(np.asarray(probs, np.float64)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


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


class Postprocessor:
    """Graph probabilities -> result dicts: temperature, top-k with label names, reject.

    With a ``reject_threshold``, every result carries ``rejected``; a rejected one answers
    ``class_ids [-1]``, ``label_names ["unknown"]``, ``scores [top score]`` and keeps what it
    would have answered under ``candidates``.
    """

    def __init__(self, topk=DEFAULT_TOPK, label_names=None, temperature=1.0, reject_threshold=None):
        if int(topk) < 1:
            raise ConfigError("PostProcess.Topk.topk", f"must be >= 1, got {topk}")
        if not float(temperature) > 0:
            raise ConfigError("Calibration.temperature", f"must be > 0, got {temperature}")
        if reject_threshold is not None and not 0.0 <= float(reject_threshold) <= 1.0:
            raise ConfigError("Reject.threshold", f"must be a probability in [0, 1], got {reject_threshold}")
        self.topk = int(topk)
        self.label_names = list(label_names) if label_names is not None else None
        self.temperature = float(temperature)
        self.reject_threshold = None if reject_threshold is None else float(reject_threshold)

    @classmethod
    def from_spec(cls, spec, topk=None, label_names=None, reject_threshold=None):
        """The spec's post-processing; non-None arguments override it."""
        return cls(topk or spec.topk, label_names if label_names is not None else spec.label_list,
                   spec.temperature,
                   reject_threshold if reject_threshold is not None else spec.reject_threshold)

    def probabilities(self, probs):
        """Calibrated probabilities (the scores results report)."""
        return apply_temperature(probs, self.temperature)

    def __call__(self, probs, file_names=None, topk=None):
        probs = self.probabilities(np.asarray(probs, np.float32))
        results = topk_results(probs, topk or self.topk, self.label_names, file_names)
        if self.reject_threshold is None:
            return results
        for res in results:
            top = res["scores"][0]
            res["rejected"] = bool(top < self.reject_threshold)
            if res["rejected"]:
                candidates = {k: res.pop(k) for k in ("class_ids", "scores", "label_names")}
                res.update(class_ids=[UNKNOWN_ID], scores=[top], label_names=[UNKNOWN_LABEL],
                           candidates=candidates)
        return results


def format_result(res):
    """One PaddleClas-style line: ``name.jpg:\\tclass id(s): [..], score(s): [..], label_name(s): [..]``."""
    name = Path(res.get("file_name", "image")).name
    scores = [round(s, 5) for s in res["scores"]]
    return (f"{name}:\tclass id(s): {res['class_ids']}, score(s): {scores}, "
            f"label_name(s): {res['label_names']}")
