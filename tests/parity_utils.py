"""Helpers for parity tests against ``../shared/parity`` (recipe in its README).

``deterministic_state(model)`` fills a model's own state_dict with the seeded weights the PaddleClas
reference logits were computed with; ``parity_input(h, w)`` is the reference input;
``assert_logits_close`` applies the stated tolerance. Also used by the Swin parity tests.
"""
import json
import zlib

import numpy as np


def deterministic_value(key, shape, dtype):
    """The recipe's float32 array for one state_dict entry (``None`` for integer entries)."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        return None  # integer buffers (Swin relative_position_index) keep the model's value
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    shape = tuple(int(s) for s in shape)
    if key.endswith("_variance"):
        v = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("_mean"):
        v = rng.normal(0.0, 0.1, shape)
    elif len(shape) == 1:
        v = (1.0 + rng.normal(0.0, 0.1, shape)) if key.endswith("weight") else rng.normal(0.0, 0.1, shape)
    elif len(shape) == 2:
        v = rng.normal(0.0, 1.0, shape) / np.sqrt(shape[0])
    elif len(shape) == 4:
        v = rng.normal(0.0, 1.0, shape) * np.sqrt(1.0 / np.prod(shape[1:]))
    else:
        raise ValueError(f"parity recipe has no rule for {key} with shape {shape}")
    return v.astype("float32")


def _dtype_name(tensor):
    return str(tensor.dtype).replace("paddle.", "")


def deterministic_state(model):
    """Return {key: numpy array} for every entry of ``model.state_dict()`` per the recipe."""
    out = {}
    for key, tensor in model.state_dict().items():
        value = deterministic_value(key, tensor.shape, _dtype_name(tensor))
        out[key] = tensor.numpy() if value is None else value
    return out


def parity_input(h=224, w=None):
    """``default_rng(0).standard_normal((2, 3, H, W))`` as float32."""
    return np.random.default_rng(0).standard_normal((2, 3, h, h if w is None else w)).astype("float32")


def assert_logits_close(ours, ref):
    """``max|ours - ref| <= 1e-4 * max(1, max|ref|)`` with a message giving the actual error."""
    ours, ref = np.asarray(ours, dtype="float64"), np.asarray(ref, dtype="float64")
    assert ours.shape == ref.shape, f"logits shape {ours.shape} != reference {ref.shape}"
    err = float(np.abs(ours - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def model_signature(model):
    """{key: (shape list, dtype str)} of a model's state_dict, comparable to ``keys_json``."""
    return {k: (list(v.shape), _dtype_name(v)) for k, v in model.state_dict().items()}


def keys_json(path):
    """Load ``<Name>.keys.json`` as {key: (shape list, dtype str)}."""
    return {k: (list(shape), dtype) for k, shape, dtype in json.loads(path.read_text())}
