"""Load a PaddleClas-style YAML config, apply ``-o`` overrides, validate it, save it resolved.

Differences from PaddleClas, on purpose:
- ``-o key=value`` values are parsed as YAML, never with Python ``eval`` (PaddleClas evaluates them,
  which runs arbitrary code from a command line or a CI variable).
- Unknown sections and keys are errors that name the key path and the closest valid name;
  PaddleClas silently creates or swallows them, so a typo trains with a default.
- Numeric strings that YAML 1.1 leaves as text (``1e-3``, ``1.0/255.0``) become numbers everywhere.

Component sections (``Arch``, ``Loss``, ``Optimizer.lr``, transforms, ...) are checked against the
constructor signature of the registered class they name (``registry.check_kwargs``), so this file
only holds the schema of the plain sections (``Global``, ``AMP``, ``EMA``, ``FineTune``, ...).
"""
import copy
import logging
import re
from pathlib import Path

import yaml

from .errors import ConfigError
from .registry import closest
from .utils.atomic_io import write_text_atomic

_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMERIC = re.compile(rf"^\s*({_NUM})\s*(?:/\s*({_NUM})\s*)?$")

ANY = object()  # schema marker: any value accepted
NUMBER = (int, float)

# Plain sections: key -> accepted types (None means the key may be null).
GLOBAL_SCHEMA = {
    "checkpoints": (str, None), "pretrained_model": (str, None), "output_dir": (str,),
    "device": (str,), "save_interval": (int,), "eval_during_train": (bool,),
    "eval_interval": (int,), "start_eval_epoch": (int,), "epochs": (int,),
    "print_batch_step": (int,), "use_visualdl": (bool,), "image_shape": (list,),
    "save_inference_dir": (str,), "to_static": (bool,), "seed": (int, None),
    "update_freq": (int,), "class_num": (int,), "export_onnx": (bool, None),
    "cpu_threads": (int, None), "use_dali": (bool,), "auto_resume": (bool,),
    "early_stop_patience": (int, None), "early_stop_min_delta": NUMBER,
    # PaddleClas keys accepted so its configs load unchanged; see NO_EFFECT for what they do here.
    "image_channel": (int,), "use_multilabel": (bool,),
}
AMP_SCHEMA = {
    "use_amp": (bool,), "level": (str,), "scale_loss": NUMBER, "use_dynamic_loss_scaling": (bool,),
    "use_promote": (bool,), "use_fp16_test": (bool,), "dtype": (str,),
}
EMA_SCHEMA = {"decay": NUMBER}
# Our fine-tuning strategies (docs/finetuning.md). Each key is one knob.
FINETUNE_SCHEMA = {
    "freeze_backbone_epochs": (int,), "unfreeze_lr_factor": NUMBER, "linear_probe": (bool,),
    "layer_decay": (float, int, None), "freeze_bn_stats": (bool,), "feature_cache_mb": NUMBER,
}
LOADER_SCHEMA = {"num_workers": (int,), "use_shared_memory": (bool,)}
TOPK_SCHEMA = {"name": (str,), "topk": (int,), "class_id_map_file": (str, None)}
# PaddleClas ThreshOutput: binary PULC models report class 1 when its softmax score >= threshold.
THRESH_SCHEMA = {"name": (str,), "threshold": NUMBER, "label_0": (str,), "label_1": (str,)}
POSTPROCESS_SCHEMAS = {"Topk": TOPK_SCHEMA, "ThreshOutput": THRESH_SCHEMA}
INFER_SCHEMA = {"infer_imgs": (str, list), "batch_size": (int,), "transforms": (list,),
                "PostProcess": (dict, None)}
# tools/export_model.py beyond PaddleClas (docs/deploy.md §1): the certificate, calibration, reject.
EXPORT_SCHEMA = {"calibrate": (bool,), "ece_bins": (int,), "reject_threshold": (float, int, None),
                 "certify_samples": (int, None), "certify_atol": NUMBER, "choose_engine": (bool,),
                 "serve_batch": (int,)}
SECTIONS = ("Global", "Arch", "Loss", "Optimizer", "DataLoader", "Infer", "Metric", "AMP", "EMA",
            "FineTune", "Slim", "Export")
REQUIRED_SECTIONS = ("Global", "Arch")
# Arch keys consumed by models.build_model itself rather than the constructor.
# ``use_sync_bn`` is read by the engine (SyncBatchNorm conversion on multi-device runs).
ARCH_BUILDER_KEYS = ("name", "pretrained", "use_ssld", "pretrained_variant", "load_strict",
                     "use_imagenet22kto1k_pretrained", "use_imagenet22k_pretrained", "use_sync_bn")

# Keys PaddleClas accepts that change nothing here: each is logged once when a config sets it.
NO_EFFECT = {
    "Global.image_channel": "PaddleClas configs use it only as a YAML anchor; the channel count "
                            "comes from Global.image_shape and Arch.input_image_channel",
    "Slim": "quantisation and pruning (PaddleSlim) are not supported; the model trains in float "
            "without them",
    "Infer.PostProcess": "ThreshOutput post-processing is not implemented: infer and the exported "
                         "model report top-k classes and scores instead",
}
_LOG = logging.getLogger("ppcls_ft")
_warned = set()


def warn_no_effect(key, why):
    """Log once per process that ``key`` is accepted but has no effect here, and why."""
    if key in _warned:
        return
    _warned.add(key)
    _LOG.warning("%s is accepted but has no effect in ppcls_ft: %s", key, why)


# Names that make a config multi-label (sigmoid per class, a label vector per image). Training
# them needs another dataset, loss, metric and head, which ppcls_ft does not have.
_MULTILABEL_NAMES = ("MultiLabelDataset", "MultiLabelLoss", "MultiLabelAsymmetricLoss",
                     "MultiLabelMAP", "ATTRMetric", "AttrDataset", "MultiLabelThreshOutput")
MULTILABEL_MESSAGE = ("multi-label (attribute) classification is not supported by ppcls_ft, "
                      "which trains single-label classifiers only")


def to_number(value):
    """``'1e-3'`` -> 0.001, ``'1.0/255.0'`` -> 0.00392..., anything else unchanged."""
    if not isinstance(value, str):
        return value
    m = _NUMERIC.match(value)
    if not m:
        return value
    num, den = m.group(1), m.group(2)
    if den is None:
        return float(num) if any(c in num for c in ".eE") else int(num)
    return float(num) / float(den)


def _numify(node):
    if isinstance(node, dict):
        return {k: _numify(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numify(v) for v in node]
    return to_number(node)


def parse_override(text):
    """``'a.b.0.c=value'`` -> (['a', 'b', 0, 'c'], parsed value). The value is YAML, never eval'd."""
    if "=" not in text:
        raise ConfigError("-o", f"override {text!r} must look like Section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError("-o", f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"override value {raw!r} is not valid YAML: {exc}") from None
    return [int(p) if p.lstrip("-").isdigit() else p for p in parts], _numify(value)


def apply_overrides(cfg, overrides):
    """Return a copy of ``cfg`` with each ``a.b.0.c=value`` applied (lists addressed by index)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides or ():
        parts, value = parse_override(text)
        node, done = cfg, []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(map(str, done + [part]))
            if isinstance(node, list):
                if not isinstance(part, int) or not -len(node) <= part < len(node):
                    raise ConfigError(where, f"list index out of range (the list has {len(node)} items)")
            elif isinstance(node, dict):
                if isinstance(part, int):
                    part = str(part)
                if part not in node and not last:
                    node[part] = {}  # a new section or sub-dict; validation rejects unknown names
            else:
                raise ConfigError(".".join(map(str, done)), f"is a value, not a section; cannot set {where}")
            if last:
                node[part] = value
            else:
                if node[part] is None:
                    node[part] = {}
                node = node[part]
            done.append(part)
    return cfg


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError("-c", f"config file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a YAML mapping with sections such as Global and Arch")
    return _numify(data)


def load_config(path, overrides=None, validate=True):
    """Read ``path``, apply ``overrides`` (list of ``a.b=value`` strings), validate; returns a dict."""
    cfg = apply_overrides(read_yaml(path), overrides)
    cfg = _resolve_aliases(cfg)
    if validate:
        validate_config(cfg)
    return cfg


def save_config(cfg, output_dir, name="config.yaml"):
    """Write the resolved config next to the checkpoints so a run can be reproduced."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / name, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def _resolve_aliases(cfg):
    glob = cfg.get("Global") or {}
    arch = cfg.get("Arch")
    if "class_num" in glob and isinstance(arch, dict):
        # PaddleClas deprecated Global.class_num in favour of Arch.class_num; accept both, never two values.
        if "class_num" in arch and arch["class_num"] != glob["class_num"]:
            raise ConfigError("Global.class_num", f"is {glob['class_num']} but Arch.class_num is "
                                                  f"{arch['class_num']}; remove Global.class_num")
        arch.setdefault("class_num", glob["class_num"])
    return cfg


# ---------------------------------------------------------------- validation

def check_schema(section, schema, path):
    """Check a plain dict section against ``{key: types}``."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(path, f"must be a mapping, got {type(section).__name__}")
    for key, value in section.items():
        if key not in schema:
            raise ConfigError(f"{path}.{key}", f"unknown key{closest(key, schema)}; "
                                               f"valid keys: {', '.join(schema)}")
        types = schema[key]
        if types is ANY:
            continue
        if value is None and None in types:
            continue
        real = tuple(t for t in types if t is not None)
        ok = isinstance(value, real) and not (isinstance(value, bool) and bool not in real)
        if float in real and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join("null" if t is None else t.__name__ for t in types)
            raise ConfigError(f"{path}.{key}", f"expected {names}, got {type(value).__name__} {value!r}")


def _named_entry(entry, path):
    """``{Name: {kwargs}}`` (one key) -> (name, kwargs)."""
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(path, f"must be a one-key mapping like {{Name: {{...}}}}, got {entry!r}")
    name, kwargs = next(iter(entry.items()))
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"{path}.{name}", f"must be a mapping of arguments, got {kwargs!r}")
    return name, dict(kwargs or {})


def _check_named_list(registry, entries, path, skip=(), drop=()):
    if entries is None:
        return
    if not isinstance(entries, list):
        raise ConfigError(path, f"must be a list of {{Name: {{...}}}} entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        name, kwargs = _named_entry(entry, f"{path}.{i}")
        for key in drop:
            kwargs.pop(key, None)
        registry.check(name, kwargs, f"{path}.{i}.{name}", skip=skip)


def _check_named_section(registry, section, path, skip=(), drop=()):
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(path, "must be a mapping with a 'name' key")
    kwargs = {k: v for k, v in section.items() if k != "name" and k not in drop}
    registry.check(section["name"], kwargs, path, skip=skip)


def _check_dataloader(section, path):
    from . import registry as R
    if not isinstance(section, dict):
        raise ConfigError(path, "must be a mapping with dataset, sampler and loader")
    check_schema(section, {"dataset": (dict,), "sampler": (dict,), "loader": (dict, None)}, path)
    if "dataset" not in section:
        raise ConfigError(path, "missing required key 'dataset'")
    ds = section["dataset"]
    _check_named_section(R.DATASETS, ds, f"{path}.dataset", drop=("batch_transform_ops",),
                         skip=("class_num",))
    _check_named_list(R.TRANSFORMS, ds.get("transform_ops"), f"{path}.dataset.transform_ops")
    _check_named_list(R.BATCH_OPS, ds.get("batch_transform_ops"), f"{path}.dataset.batch_transform_ops",
                      skip=("class_num",))
    if "sampler" in section:
        _check_named_section(R.SAMPLERS, section["sampler"], f"{path}.sampler", skip=("dataset",))
    check_schema(section.get("loader"), LOADER_SCHEMA, f"{path}.loader")


def _named_in(entries):
    """Names of a ``[{Name: {...}}, ...]`` list (anything else yields nothing)."""
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and len(entry) == 1:
            yield next(iter(entry))


def refuse_multilabel(cfg):
    """ConfigError naming the first key that makes ``cfg`` a multi-label config, else None."""
    glob = cfg.get("Global") if isinstance(cfg.get("Global"), dict) else {}
    if glob.get("use_multilabel"):
        raise ConfigError("Global.use_multilabel", f"is True: {MULTILABEL_MESSAGE}")
    if "MLDecoder" in cfg:
        raise ConfigError("MLDecoder", f"is the multi-label ML-Decoder head: {MULTILABEL_MESSAGE}")
    found = []
    for mode in ("Train", "Eval"):
        for section in ("Loss", "Metric"):
            names = _named_in((cfg.get(section) or {}).get(mode) if isinstance(cfg.get(section), dict) else None)
            found += [(f"{section}.{mode}.{i}.{n}", n) for i, n in enumerate(names)]
        loader = (cfg.get("DataLoader") or {}).get(mode) if isinstance(cfg.get("DataLoader"), dict) else None
        dataset = loader.get("dataset") if isinstance(loader, dict) else None
        if isinstance(dataset, dict):
            found.append((f"DataLoader.{mode}.dataset.name", dataset.get("name")))
    post = (cfg.get("Infer") or {}).get("PostProcess") if isinstance(cfg.get("Infer"), dict) else None
    if isinstance(post, dict):
        found.append(("Infer.PostProcess.name", post.get("name")))
    for key, name in found:
        if name in _MULTILABEL_NAMES:
            raise ConfigError(key, f"{name} is multi-label: {MULTILABEL_MESSAGE}")


def _check_postprocess(post):
    if post is None:
        return
    if not isinstance(post, dict):
        raise ConfigError("Infer.PostProcess", f"must be a mapping with a name, got {post!r}")
    name = post.get("name", "Topk")
    if name not in POSTPROCESS_SCHEMAS:
        raise ConfigError("Infer.PostProcess.name", f"unknown post-process {name!r}"
                                                    f"{closest(name, POSTPROCESS_SCHEMAS)}; choices: "
                                                    f"{', '.join(POSTPROCESS_SCHEMAS)}")
    check_schema(post, POSTPROCESS_SCHEMAS[name], "Infer.PostProcess")
    if name == "ThreshOutput":
        if "threshold" not in post:
            raise ConfigError("Infer.PostProcess", "ThreshOutput needs threshold (the class-1 score "
                                                   "above which class 1 is reported, e.g. 0.9)")
        warn_no_effect("Infer.PostProcess", NO_EFFECT["Infer.PostProcess"])


def validate_config(cfg):
    """Raise ConfigError for the first unknown section/key, wrong type or missing required key.

    A multi-label config is refused first, with one line naming the key that makes it so.
    """
    from . import registry as R
    _import_components()
    refuse_multilabel(cfg)
    for name in cfg:
        if name not in SECTIONS:
            raise ConfigError(name, f"unknown section{closest(name, SECTIONS)}; sections: {', '.join(SECTIONS)}")
    for name in REQUIRED_SECTIONS:
        if not isinstance(cfg.get(name), dict):
            raise ConfigError(name, "required section is missing")
    check_schema(cfg["Global"], GLOBAL_SCHEMA, "Global")
    _check_named_section(R.MODELS, cfg["Arch"], "Arch", drop=ARCH_BUILDER_KEYS)
    for mode in ("Train", "Eval"):
        _check_named_list(R.LOSSES, (cfg.get("Loss") or {}).get(mode), f"Loss.{mode}", drop=("weight",))
        _check_named_list(R.METRICS, (cfg.get("Metric") or {}).get(mode), f"Metric.{mode}")
        loader = (cfg.get("DataLoader") or {}).get(mode)
        if loader is not None:
            _check_dataloader(loader, f"DataLoader.{mode}")
    for section, sub in (("Loss", ("Train", "Eval")), ("Metric", ("Train", "Eval")),
                         ("DataLoader", ("Train", "Eval"))):
        check_schema(cfg.get(section), {k: (list, dict, None) for k in sub}, section)
    opt = cfg.get("Optimizer")
    if opt is not None:
        _check_named_section(R.OPTIMIZERS, opt, "Optimizer", drop=("lr",))
        if "lr" not in opt:
            raise ConfigError("Optimizer", "missing required key 'lr' (e.g. lr: {name: Cosine, learning_rate: 0.01})")
        _check_named_section(R.LR_SCHEDULERS, opt["lr"], "Optimizer.lr", skip=("epochs", "steps_per_epoch"))
    infer = cfg.get("Infer")
    check_schema(infer, INFER_SCHEMA, "Infer")
    if infer:
        _check_named_list(R.TRANSFORMS, infer.get("transforms"), "Infer.transforms")
        _check_postprocess(infer.get("PostProcess"))
    check_schema(cfg.get("AMP"), AMP_SCHEMA, "AMP")
    check_schema(cfg.get("EMA"), EMA_SCHEMA, "EMA")
    check_schema(cfg.get("FineTune"), FINETUNE_SCHEMA, "FineTune")
    if cfg.get("Slim") is not None:
        if not isinstance(cfg["Slim"], dict):
            raise ConfigError("Slim", f"must be a mapping (PaddleSlim options), got {cfg['Slim']!r}")
        warn_no_effect("Slim", NO_EFFECT["Slim"])
    if "image_channel" in cfg["Global"]:
        warn_no_effect("Global.image_channel", NO_EFFECT["Global.image_channel"])
    check_schema(cfg.get("Export"), EXPORT_SCHEMA, "Export")
    reject = (cfg.get("Export") or {}).get("reject_threshold")
    if reject is not None and not 0 <= reject <= 1:
        raise ConfigError("Export.reject_threshold", f"must be a probability in [0, 1] (or null), got {reject}")
    shape = cfg["Global"].get("image_shape")
    if shape is not None and (len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise ConfigError("Global.image_shape", f"must be [channels, height, width], got {shape!r}")
    return cfg


def _import_components():
    """Import every module that registers components, so validation sees all names."""
    from . import data, losses, metrics, models, optim  # noqa: F401
