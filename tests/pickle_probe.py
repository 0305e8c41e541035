"""Load pickles with plain ``pickle`` and write what they hold in a numpy-version-neutral form.

Run by tests/test_portable_save.py under another Python (one with numpy 1.24.4, as PaddleClas
pins): ``python pickle_probe.py OUT_PREFIX FILE...``. Imports only numpy and the standard library,
so it runs in a bare numpy venv. Writes ``OUT_PREFIX.json`` (numpy version, and for every file the
structure with types and plain values) and ``OUT_PREFIX.npz`` (the arrays, referenced by index
from the JSON). Running it under both numpy versions and comparing the outputs shows that both
read the same values; npz and JSON are read by either numpy without pickle.
"""
import json
import pickle
import sys

import numpy as np


def describe(tree, arrays):
    """A JSON-able description of ``tree``; arrays and numpy scalars go to ``arrays``."""
    if isinstance(tree, dict):
        return {"dict": [[describe(k, arrays), describe(v, arrays)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {type(tree).__name__: [describe(v, arrays) for v in tree]}
    if isinstance(tree, (np.ndarray, np.generic)):
        arrays.append(np.asarray(tree))
        # dtype.str ('<f4') is spelled alike in numpy 1 and 2; the type name tells array from scalar
        return {type(tree).__name__: [len(arrays) - 1, tree.dtype.str]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {type(tree).__name__: tree}
    raise TypeError(f"unexpected {type(tree).__name__} in a checkpoint file")


def main(out_prefix, paths):
    arrays, files = [], {}
    for path in paths:
        with open(path, "rb") as f:
            files[path] = describe(pickle.load(f), arrays)
    np.savez(out_prefix + ".npz", *arrays)
    with open(out_prefix + ".json", "w", encoding="utf-8") as f:
        json.dump({"numpy": np.__version__, "files": files}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
