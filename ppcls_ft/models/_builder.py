"""``build_model`` (the YAML ``Arch`` section -> model) and the one weight loader, ``load_pretrained``.

Paddle's ``Layer.set_state_dict`` skips missing and wrong-shaped keys with a warning, and
PaddleClas relies on it, so a completely wrong file "loads" and accuracy is random. This loader
compares keys and shapes itself: on a class-count change it drops exactly the classifier keys the
model names (``classifier_prefixes``) and re-initialises the head; any other missing, unexpected
or wrong-shaped key is an error naming the file (or, with ``strict=False``, a loud report).
Files are read with the restricted unpickler in ``utils/safe_pickle.py``.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import paddle

from ..errors import ConfigError, WeightsError
from ..registry import MODELS
from ..utils.download import download
from ..utils.safe_pickle import load_pdparams
from ._urls import official_url

SHOW = 10  # keys listed per category in reports and errors


def _keys(keys, limit=SHOW):
    keys = list(keys)
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@dataclass
class LoadReport:
    """What ``load_pretrained`` did; ``str()`` is one readable paragraph for the log."""

    path: str
    loaded: int
    total: int
    head_reinitialised: Optional[int] = None  # class_num of the fresh head, or None
    head_keys: list = field(default_factory=list)  # checkpoint keys dropped for the new head
    ignored: list = field(default_factory=list)  # known legacy extras (Swin *.attn_mask)
    missing: list = field(default_factory=list)  # model keys the file lacks
    unexpected: list = field(default_factory=list)  # file keys the model lacks
    mismatched: list = field(default_factory=list)  # (key, file shape, model shape), not the head

    @property
    def complete(self):
        """True when every model tensor came from the file or from the documented head reset."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self):
        parts = [f"loaded {self.loaded}/{self.total} tensors from {self.path}"]
        if self.head_reinitialised is not None:
            parts.append(f"head re-initialised for {self.head_reinitialised} classes "
                         f"({_keys(self.head_keys)})")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} legacy entries: {_keys(self.ignored)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (left at init): {_keys(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (not loaded): {_keys(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(shown)} wrong-shaped (not loaded): {_keys(shown)}")
        return "; ".join(parts)


def list_models() -> list:
    """Every registered architecture name (the valid ``Arch.name`` values)."""
    return MODELS.names()


def _option(cfg, key, types, default, path, hint):
    value = cfg.pop(key, default)
    if value is not None and not isinstance(value, types):
        raise ConfigError(f"{path}.{key}", f"expected {hint}, got {type(value).__name__} {value!r}")
    return value


def build_model(arch_cfg, path="Arch", load_weights=True, logger=print):
    """Build the model an ``Arch`` section describes and load ``Arch.pretrained`` into it.

    Consumed keys: ``name`` (whitespace stripped: real configs have ``name: ResNet50_vd ``),
    ``pretrained`` (false | true | local path | URL), ``use_ssld``, ``pretrained_variant``
    (null | "22kto1k") and ``load_strict`` (default true). Every other key goes to the registered
    constructor, which validates it. ``load_weights=False`` builds without loading (e.g. when a
    checkpoint is restored right after); ``logger`` receives the one-line load report.
    """
    if not isinstance(arch_cfg, dict):
        raise ConfigError(path, f"must be a mapping with at least a name, got {type(arch_cfg).__name__}")
    cfg = dict(arch_cfg)
    name = cfg.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}.name", f"missing or empty; choose one of {', '.join(list_models())}")
    name = name.strip()
    pretrained = _option(cfg, "pretrained", (bool, str), False, path, "false, true, a path or a URL")
    use_ssld = _option(cfg, "use_ssld", bool, False, path, "true or false")
    variant = _option(cfg, "pretrained_variant", str, None, path, "null or '22kto1k'")
    strict = _option(cfg, "load_strict", bool, True, path, "true or false")
    # PaddleClas's Swin spelling of the same choice; accepted so its configs run unchanged.
    if _option(cfg, "use_imagenet22kto1k_pretrained", bool, False, path, "true or false"):
        variant = variant or "22kto1k"
    if _option(cfg, "use_imagenet22k_pretrained", bool, False, path, "true or false"):
        raise ConfigError(f"{path}.use_imagenet22k_pretrained", "ImageNet-22k (21841-class) weights "
                          "are not in the official table; use pretrained_variant: 22kto1k")
    # Read by the engine (SyncBatchNorm on multi-device runs), never by a constructor.
    cfg.pop("use_sync_bn", None)
    if pretrained is True:
        official_url(name, use_ssld=use_ssld, variant=variant)  # fail before building a big model
    elif (use_ssld or variant is not None) and pretrained not in (False, None, ""):
        key = "use_ssld" if use_ssld else "pretrained_variant"
        raise ConfigError(f"{path}.{key}", f"only selects which official file pretrained: true "
                          f"downloads; with pretrained: {pretrained!r} it would be ignored. "
                          f"Remove it or set pretrained: true")
    elif use_ssld or variant is not None:
        # No weights at all: PaddleClas ignores use_ssld then, and its PULC configs (use_ssld:
        # True) are run with -o Arch.pretrained=False to train from scratch; accept and say so.
        key = "use_ssld" if use_ssld else "pretrained_variant"
        from ..config import warn_no_effect
        warn_no_effect(f"{path}.{key}", f"it only selects which official file pretrained: true "
                                        f"downloads, and pretrained is {pretrained!r}")
        use_ssld, variant = False, None
    MODELS.get(name, f"{path}.name")  # unknown name -> error on the name key, with suggestions
    model = MODELS.build(name, cfg, path)
    if load_weights and pretrained not in (False, None, ""):
        load_pretrained(model, pretrained, strict=strict, use_ssld=use_ssld, variant=variant,
                        arch_name=name, logger=logger)
    return model


def resolve_source(source, *, use_ssld=False, variant=None, arch_name=None, download_fn=download):
    """Turn ``pretrained`` / ``pretrained_model`` into a local file path.

    ``True`` -> the official URL for ``arch_name``; ``http(s)://`` -> downloaded into the cache;
    otherwise a path prefix where ``.pdparams`` is optional (``output/best_model`` ==
    ``output/best_model.pdparams``).
    """
    if source is True:
        if not arch_name:
            raise WeightsError("pretrained=True needs arch_name to find the official weights")
        source = official_url(arch_name, use_ssld=use_ssld, variant=variant)
    source = str(source)
    if source.startswith(("http://", "https://")):
        return Path(download_fn(source))
    raw = Path(os.path.expanduser(source))
    tried = [raw] if raw.suffix == ".pdparams" else [raw.with_name(raw.name + ".pdparams"), raw]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise WeightsError(f"weights file not found; tried: {', '.join(str(p) for p in tried)}; point "
                       "Global.pretrained_model (or Arch.pretrained) at an existing .pdparams file "
                       "or its prefix, e.g. output/best_model")


def _numpy_dtype(tensor):
    """numpy dtype of a Paddle tensor, or None when Paddle cannot take numpy's (bfloat16: plain
    numpy has no such dtype, and once ``ml_dtypes`` is imported - onnx imports it - numpy has
    one that Paddle refuses with "Not supported numpy dtype bfloat16")."""
    name = str(tensor.dtype).replace("paddle.", "")
    if name == "bfloat16":
        return None
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _assign(tensor, array):
    """Copy ``array`` into ``tensor`` in place, cast to the tensor's dtype."""
    dtype = _numpy_dtype(tensor)
    if dtype is not None:
        tensor.set_value(np.ascontiguousarray(array, dtype=dtype))
    else:  # e.g. bfloat16: let Paddle do the cast
        tensor.set_value(paddle.to_tensor(np.asarray(array, np.float32)).astype(tensor.dtype))


def compare_state(model, state):
    """Split a (adapted) checkpoint against ``model.state_dict()``.

    Returns ``(fits, report_fields)``: ``fits`` maps key -> array for the tensors that can load;
    report_fields holds ignored / missing / unexpected / mismatched and the head decision.
    """
    own = model.state_dict()
    ignored = [k for k in state if k not in own and k.endswith(".attn_mask")]
    unexpected = [k for k in state if k not in own and k not in ignored]
    missing = [k for k in own if k not in state]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head_bad = [m for m in mismatched if model.is_classifier_key(m[0])]
    head_keys = []
    if head_bad:  # class-count change: drop the whole classifier from the file, re-init it
        head_keys = [k for k in own if model.is_classifier_key(k) and k in state]
        mismatched = [m for m in mismatched if not model.is_classifier_key(m[0])]
    skip = {m[0] for m in mismatched} | set(head_keys)
    fits = {k: state[k] for k in own if k in state and k not in skip}
    return fits, dict(ignored=ignored, missing=missing, unexpected=unexpected,
                      mismatched=mismatched, head_keys=head_keys)


def _strict_error(path, model, info):
    lines = [f"{path} does not fit {type(model).__name__}:"]
    if info["missing"]:
        lines.append(f"  {len(info['missing'])} missing keys: {_keys(info['missing'])}")
    if info["unexpected"]:
        lines.append(f"  {len(info['unexpected'])} unexpected keys: {_keys(info['unexpected'])}")
    if info["mismatched"]:
        shown = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in info["mismatched"]]
        lines.append(f"  {len(shown)} wrong-shaped keys: {_keys(shown)}")
    lines.append("Check that Arch.name and its constructor arguments match the checkpoint, or set "
                 "Arch.load_strict: false to load only what fits.")
    return WeightsError("\n".join(lines))


def load_state_exact(model, state, path):
    """Resume: every key and shape must match ``model`` (classifier included), else a
    ``WeightsError`` listing what differs. Writes into the live tensors (``use_hook=False``: under
    AMP O2 the hooked ``state_dict()`` returns float32 copies) in each tensor's own dtype."""
    own = model.state_dict(use_hook=False)
    _, info = compare_state(model, state)
    info["mismatched"] += [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in info["head_keys"]
                           if tuple(state[k].shape) != tuple(own[k].shape)]
    if info["missing"] or info["unexpected"] or info["mismatched"]:
        raise _strict_error(path, model, info)
    with paddle.no_grad():
        for key, tensor in own.items():
            _assign(tensor, state[key])


def load_pretrained(model, source, *, strict=True, use_ssld=False, variant=None, arch_name=None,
                    logger=print) -> LoadReport:
    """Load weights into ``model`` after checking every key and shape; returns a ``LoadReport``.

    ``source``: ``True`` (official weights of ``arch_name``), an http(s) URL, or a local path with
    or without ``.pdparams``. A classifier whose shape differs (another class count) is dropped
    and re-initialised with ``model.reset_classifier(model.class_num)``; anything else that does
    not fit raises ``WeightsError`` unless ``strict=False``, which loads what fits and reports the rest.
    """
    path = resolve_source(source, use_ssld=use_ssld, variant=variant, arch_name=arch_name)
    state = model.adapt_state_dict(load_pdparams(path))
    fits, info = compare_state(model, state)
    if strict and (info["missing"] or info["unexpected"] or info["mismatched"]):
        raise _strict_error(path, model, info)
    head = None
    if info["head_keys"]:
        head = model.class_num
        model.reset_classifier(head)
    own = model.state_dict()  # after a head reset the classifier tensors are new objects
    with paddle.no_grad():
        for key, array in fits.items():
            _assign(own[key], array)
    report = LoadReport(path=str(path), loaded=len(fits), total=len(own), head_reinitialised=head,
                        **info)
    if logger is not None:
        logger(str(report))
    return report
