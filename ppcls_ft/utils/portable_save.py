"""``save(obj, path)``: the file ``paddle.save`` writes, readable under numpy 1.x and numpy 2.

Why this exists: pickling a numpy array names the function that rebuilds it. numpy 2 renamed
``numpy.core`` to ``numpy._core``, so an array pickled under numpy 2 references
``numpy._core.multiarray._reconstruct``, and PaddleClas's environment (numpy 1.24.4) fails with
``ModuleNotFoundError: No module named 'numpy._core'``. The only spelling both versions resolve is
``numpy.core.multiarray``; numpy 2 keeps ``_reconstruct`` and ``scalar`` there as plain
attributes "to support old pickle files" (numpy/core/multiarray.py), so loading is silent, while
any other ``numpy.core`` attribute goes through a ``__getattr__`` that warns. numpy 1.x pickles use
exactly these two names, so a file from here looks to PaddleClas like one from its own numpy.

Why it is written by hand: ``paddle.save`` (Paddle 3.3) has no hook for this: its options are
``protocol``, ``use_binary_format`` and ``safetensors``, and it pickles with the stdlib C pickler,
which only writes a global under the ``__module__`` of the real object. The C pickler cannot be
told to write another module name either: a global is checked to be the identical object at that
name, and under numpy 2 ``numpy.core.multiarray._reconstruct`` *is* the ``numpy._core`` function,
whose ``__module__`` says ``numpy._core.multiarray``. So this module uses the pure-Python pickler:
``reducer_override`` turns arrays, numpy scalars and Tensors into the reductions numpy and Paddle
give them, with the rebuild function replaced by a ``_GlobalRef``, and the dispatch table writes a
``_GlobalRef`` as module + name + ``STACK_GLOBAL``, the opcodes the stdlib writes for a global.
No bytes are rewritten after pickling.

Format kept from ``paddle.save`` (paddle/framework/io.py), protocol 4:

- a "state dict" (a dict whose values are all Tensors, or dicts holding no Tensor): Tensors become
  ndarrays and a ``StructuredToParameterName@@`` dict maps each such key to the Tensor's name;
- anything else: the object as is, each Tensor reduced to ``tuple((tensor.name, ndarray))``.

``paddle.load`` and ``utils/safe_pickle.py`` read both. ``paddle.nn.Layer`` objects are refused,
as ``paddle.save`` refuses them. Parent folders are not created: the caller owns the path.
"""
import pickle

import numpy as np
import paddle

from .safe_pickle import STRUCTURED_NAME_KEY

PROTOCOL = 4  # paddle.save's default; also the first protocol without a 4 GiB object limit
NUMPY_COMPAT_MODULE = "numpy.core.multiarray"

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray


class _GlobalRef:
    """``func`` to be pickled as the global ``module.name``, without looking that name up.

    Calling it calls ``func``: pickle only accepts a callable as the first item of a reduction.
    """

    __slots__ = ("module", "name", "func")

    def __init__(self, module, name, func):
        self.module = module
        self.name = name
        self.func = func

    def __call__(self, *args):
        return self.func(*args)


# One instance per name: the pickler memoizes by identity, so each is written once per file.
_RENAMED = {func: _GlobalRef(NUMPY_COMPAT_MODULE, func.__name__, func)
            for func in (_multiarray._reconstruct, _multiarray.scalar)}


def _tensor_to_numpy(tensor):
    # paddle.save converts the same way: a host copy of the Tensor's data, in its own dtype.
    return np.array(tensor.cpu())


def _portable_reduce(obj):
    """numpy's own reduction of an array or scalar, with the rebuild function renamed."""
    func, *rest = obj.__reduce__()
    return (_RENAMED.get(func, func), *rest)


def _save_global_ref(pickler, ref):
    # What pickle's save_global emits at protocol 4, minus the identity check we must skip.
    pickler.save(ref.module)
    pickler.save(ref.name)
    pickler.write(pickle.STACK_GLOBAL)
    pickler.memoize(ref)


class _PortablePickler(pickle._Pickler):
    """The pure-Python pickler (the C one cannot write a renamed global) with numpy 1 names."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_GlobalRef] = _save_global_ref

    def reducer_override(self, obj):
        if isinstance(obj, (np.ndarray, np.generic)):
            return _portable_reduce(obj)
        if isinstance(obj, paddle.Tensor):
            return tuple, ((obj.name, _tensor_to_numpy(obj)),)
        if isinstance(obj, paddle.nn.Layer):
            raise TypeError(f"cannot save a {type(obj).__name__} Layer object; save its state_dict()")
        return NotImplemented


def _holds_tensor(tree):
    if isinstance(tree, (paddle.Tensor, paddle.nn.Layer)):
        return True
    if isinstance(tree, dict):
        return any(_holds_tensor(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_holds_tensor(v) for v in tree)
    return False


def is_state_dict(obj):
    """paddle.save's test: every value is a Tensor, or a dict with no Tensor anywhere inside."""
    return isinstance(obj, dict) and all(
        isinstance(v, paddle.Tensor) or (isinstance(v, dict) and not _holds_tensor(v))
        for v in obj.values())


def as_saved(obj):
    """The object paddle.save pickles for ``obj``: state dicts get arrays and the name table."""
    if not is_state_dict(obj):
        return obj
    saved = {k: _tensor_to_numpy(v) if isinstance(v, paddle.Tensor) else v for k, v in obj.items()}
    saved[STRUCTURED_NAME_KEY] = {k: v.name for k, v in obj.items() if isinstance(v, paddle.Tensor)}
    return saved


def save(obj, path):
    """Write ``obj`` to ``path`` in paddle.save's format with numpy-1-compatible references."""
    with open(path, "wb") as f:
        _PortablePickler(f, PROTOCOL).dump(as_saved(obj))
