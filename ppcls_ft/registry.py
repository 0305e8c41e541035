"""Name -> class registries: how a YAML ``name:`` becomes an object, with no ``eval``.

Each kind of component has one ``Registry`` instance below. ``Registry.build`` checks the YAML
keys against the constructor's keyword signature before calling it, so a typo fails at start-up
with the config path and the closest valid name instead of being swallowed by ``**kwargs``.
"""
import difflib
import inspect
import typing

from .errors import ConfigError

_SIMPLE_TYPES = (bool, int, float, str, list, tuple, dict)


def closest(name, choices):
    """Return ' (did you mean X?)' for the nearest choice, or ''."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _accepts(annotation, value):
    """True when ``value`` fits a simple annotation; unknown annotations accept anything."""
    if annotation is inspect.Parameter.empty or value is None:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        # None was accepted above; NoneType itself is no simple type and would accept anything
        return any(_accepts(a, value) for a in typing.get_args(annotation) if a is not type(None))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation not in _SIMPLE_TYPES:
        return True
    if annotation is float:  # YAML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, annotation)


def check_kwargs(fn, kwargs, path, skip=()):
    """Validate ``kwargs`` against ``fn``'s signature; raise ConfigError naming ``path``."""
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items() if n not in ("self",) + tuple(skip)}
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for key, value in kwargs.items():
        if key not in named:
            if takes_var_kw:
                continue
            raise ConfigError(f"{path}.{key}" if path else key,
                              f"unknown key{closest(key, named)}; valid keys: {', '.join(named) or 'none'}")
        if not _accepts(named[key].annotation, value):
            ann = getattr(named[key].annotation, "__name__", str(named[key].annotation))
            raise ConfigError(f"{path}.{key}" if path else key,
                              f"expected {ann}, got {type(value).__name__} {value!r}")
    for name, p in named.items():
        if p.default is p.empty and name not in kwargs:
            raise ConfigError(path, f"missing required key {name!r}")


class Registry:
    """A named table of classes or factories of one kind (models, transforms, losses, ...)."""

    def __init__(self, kind):
        self.kind = kind
        self._table = {}

    def register(self, obj=None, *, name=None):
        """Decorator: ``@MODELS.register`` or ``@MODELS.register(name="X")``."""
        def add(o):
            key = name or o.__name__
            if key in self._table and self._table[key] is not o:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._table[key] = o
            return o
        return add(obj) if obj is not None else add

    def get(self, name, path=""):
        key = str(name).strip()
        if key not in self._table:
            raise ConfigError(path, f"unknown {self.kind} {key!r}{closest(key, self._table)}; "
                                    f"choices: {', '.join(sorted(self._table))}")
        return self._table[key]

    def check(self, name, kwargs=None, path="", skip=()):
        """Validate a YAML entry without building it."""
        check_kwargs(self.get(name, path), dict(kwargs or {}), path, skip)

    def build(self, name, kwargs=None, path="", **extra):
        """Build ``name(**kwargs, **extra)``; ``extra`` holds cross-section values (class_num, ...)."""
        obj = self.get(name, path)
        kwargs = dict(kwargs or {})
        check_kwargs(obj, kwargs, path, skip=tuple(extra))
        return obj(**kwargs, **extra)

    def names(self):
        return sorted(self._table)

    def __contains__(self, name):
        return str(name).strip() in self._table

    def __len__(self):
        return len(self._table)


MODELS = Registry("model")
TRANSFORMS = Registry("transform")
BATCH_OPS = Registry("batch operator")
DATASETS = Registry("dataset")
SAMPLERS = Registry("sampler")
LOSSES = Registry("loss")
METRICS = Registry("metric")
OPTIMIZERS = Registry("optimizer")
LR_SCHEDULERS = Registry("lr schedule")
POSTPROCESS = Registry("post-process")
