"""Restricted reader for ``.pdparams`` files: numpy arrays and plain containers, nothing else.

A ``.pdparams`` file is a Python pickle (protocol 2-4) of a dict ``{key: ndarray}``. ``paddle.load``
and ``pickle.load`` will run any callable a crafted file names (``os.system``, ``builtins.eval``),
and weights are routinely downloaded from the internet. This module unpickles with an allow-list:
only numpy's array/dtype/scalar reconstruction, ``collections.OrderedDict`` and the builtins that
rebuild plain containers. Anything else raises ``WeightsError`` before it is called.

Formats seen and handled (checked with ``pickletools`` on real files):

- official PaddleClas files and ``../shared/weights``: numpy 1.x pickles, which name
  ``numpy.core.multiarray._reconstruct``; numpy 2 renamed the module to ``numpy._core``, so both
  spellings map to the same allowed objects (no import of the deprecated ``numpy.core`` shim);
- files written by ``paddle.save(model.state_dict())`` in Paddle 3: protocol 4, arrays under
  ``numpy._core``, plus a ``StructuredToParameterName@@`` dict of static names (dropped here);
- ``paddle.save`` of a dict holding Tensors that are not a state_dict: each Tensor is reduced to
  ``builtins.tuple((name, ndarray))`` (unwrapped here to the array);
- ``paddle.save(..., protocol=2|3)``: bytes go through ``_codecs.encode``, and arrays over 1 GiB are
  split into ``key@@.i`` slices described by ``UnpackBigParamInfor@@`` (re-assembled here).
"""
import codecs
import collections
import pickle
from pathlib import Path

import numpy as np

from ..errors import WeightsError

# Paddle's bookkeeping entries, not tensors (paddle/framework/io.py, io_utils.py).
STRUCTURED_NAME_KEY = "StructuredToParameterName@@"
BIG_PARAM_KEY = "UnpackBigParamInfor@@"

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray


def _allowed_globals():
    """(module, name) -> object. Every entry only builds data; none can run caller-chosen code."""
    table = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _multiarray._reconstruct
        table[(module, "scalar")] = _multiarray.scalar
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    table[("collections", "OrderedDict")] = collections.OrderedDict
    # Protocol 2 pickles store Python 3 bytes as _codecs.encode(str, "latin1").
    table[("_codecs", "encode")] = codecs.encode
    for name in ("tuple", "list", "dict", "set", "frozenset", "bytes", "bytearray",
                 "int", "float", "complex", "bool", "str", "slice"):
        table[("builtins", name)] = getattr(__import__("builtins"), name)
    return table


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only resolves names in ``_ALLOWED``."""

    def __init__(self, file, path):
        # latin1: numpy arrays pickled under Python 2 store raw bytes in str objects.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise WeightsError(
                f"{self._path}: refusing to load, the pickle references the forbidden global "
                f"'{module}.{name}'. A weights file only needs numpy arrays; this file may be "
                f"malicious or not a .pdparams state_dict. Re-export it with paddle.save(model.state_dict()).")
        return obj

    def persistent_load(self, pid):
        raise WeightsError(f"{self._path}: persistent ids are not allowed in a .pdparams file")


def _as_array(key, value, path):
    """Unwrap one state_dict value to an ndarray, or raise naming the key."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
        value = value[1]  # paddle.save reduces a Tensor to (tensor_name, ndarray)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not an array; "
                           f"is this an optimizer state (.pdopt) or a checkpoint bundle instead of .pdparams?")
    if value.dtype.hasobject:
        raise WeightsError(f"{path}: entry {key!r} is an object array; weights must be numeric")
    return value


def _join_big_params(state, path):
    """Re-assemble arrays that protocol 2/3 ``paddle.save`` split into ``key@@.i`` slices."""
    info = state.pop(BIG_PARAM_KEY, None)
    if not info:
        return state
    for key, spec in info.items():
        try:
            parts = [state.pop(part) for part in spec["slices"]]
            state[key] = np.concatenate([np.ravel(p) for p in parts]).reshape(spec["OriginShape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: split parameter {key!r} cannot be re-assembled ({exc})") from exc
    return state


def safe_load(path):
    """Unpickle ``path`` with the allow-list; returns the object (plain containers and arrays).

    Used directly for checkpoint parts that are not flat state_dicts (``.pdopt``, ``.pdstates``),
    so resuming a checkpoint cannot run code either.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except WeightsError:
        raise
    except Exception as exc:  # truncated, not a pickle, bad opcode ...
        raise WeightsError(f"{path}: not a readable .pdparams pickle "
                           f"({type(exc).__name__}: {exc}); the file may be truncated or corrupt") from exc


def unwrap_tensors(tree):
    """Replace paddle.save's ``(tensor_name, ndarray)`` pairs by the arrays, recursively."""
    if isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[0], str) and isinstance(tree[1], np.ndarray):
        return tree[1]
    if isinstance(tree, dict):
        return {k: unwrap_tensors(v) for k, v in tree.items() if k != STRUCTURED_NAME_KEY}
    if isinstance(tree, (list, tuple)):
        return type(tree)(unwrap_tensors(v) for v in tree)
    return tree


def load_pdparams(path) -> dict:
    """Read a ``.pdparams`` file safely; returns ``{key: np.ndarray}`` in file order.

    Raises ``WeightsError`` naming the file when it is missing, not a pickle, references a global
    outside the allow-list, or holds something other than a flat dict of numeric arrays.
    """
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of arrays, found {type(obj).__name__}")
    state = dict(obj)
    state.pop(STRUCTURED_NAME_KEY, None)
    state = _join_big_params(state, path)
    return {str(k): _as_array(k, v, path) for k, v in state.items()}


def to_tensors(tree):
    """numpy arrays -> paddle Tensors, recursively (``optimizer.set_state_dict`` wants Tensors)."""
    import paddle
    if isinstance(tree, dict):
        return {k: to_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_tensors(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return paddle.to_tensor(tree)
    return tree
