"""Exponential moving average of model weights (the YAML ``EMA: {decay}`` section).

``ModelEMA`` keeps a float32 shadow of every parameter and a copy of every buffer, keyed by the
model's ``state_dict`` names, so its ``state_dict()`` can be saved as a ``.pdparams`` and loaded
into the same architecture. Parameters follow ``shadow = decay * shadow + (1 - decay) * param``
after each optimizer step; buffers (batch-norm ``_mean``/``_variance``, Swin's integer
``relative_position_index``) are copied, because batch-norm running statistics already are
moving averages and averaging them a second time only makes them lag.

The model is always read through ``state_dict(use_hook=False)``: after ``paddle.amp.decorate``
(AMP O2, ``save_dtype=float32``) the hooked ``state_dict()`` returns float32 *copies*, and
writing EMA weights into copies would leave the model untouched.
"""
import contextlib

import numpy as np
import paddle

from ..errors import ConfigError


def running_stat_names(model):
    """State-dict names of batch-norm running statistics.

    Paddle stores them as *parameters* (``trainable=False``), not buffers, so they show up in
    ``named_parameters()``; only the layer type tells them apart from frozen weights.
    """
    bn_types = (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm)
    names = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, bn_types):
            base = f"{prefix}." if prefix else ""
            names.update({base + "_mean", base + "_variance"})
    return names


def _is_float(t):
    return t.dtype in (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)


class ModelEMA:
    """Shadow weights ``ema = decay * ema + (1 - decay) * w``, updated once per optimizer step.

    YAML: ``EMA: {decay: 0.9999}``. Use ``apply_to(model)`` to evaluate or save the averaged
    weights; ``state_dict()``/``set_state_dict()`` for checkpoints.
    """

    def __init__(self, model, decay: float = 0.9999):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ConfigError("EMA.decay", f"must be a number in [0, 1), e.g. 0.9999; got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        # averaged: learnable weights (frozen ones too); copied: buffers and BN running stats
        self._param_names = {name for name, _ in model.named_parameters()} - running_stat_names(model)
        self.reset(model)

    def reset(self, model):
        """Start the average afresh from ``model``'s current weights (e.g. after a resume from a
        checkpoint that has no ``.pdema``)."""
        self.shadow = {}
        self.num_updates = 0
        with paddle.no_grad():
            for name, value in model.state_dict(use_hook=False).items():
                copy = value.detach().clone()
                if _is_float(copy):
                    copy = copy.astype("float32")
                copy.stop_gradient = True
                self.shadow[name] = copy

    def _check_keys(self, names, what):
        missing = set(self.shadow) - set(names)
        extra = set(names) - set(self.shadow)
        if missing or extra:
            raise KeyError(f"EMA {what}: keys differ from the model it was made for; missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")

    @paddle.no_grad()
    def update(self, model):
        """Fold the model's current weights into the shadow (call after ``optimizer.step()``)."""
        state = model.state_dict(use_hook=False)
        self._check_keys(state, "update")
        d = self.decay
        for name, value in state.items():
            shadow = self.shadow[name]
            if name in self._param_names and _is_float(shadow):
                # in place, in float32 whatever the training dtype (AMP O2 keeps fp16 params)
                new = shadow * d + value.astype("float32") * (1.0 - d)
            else:
                new = value.astype(shadow.dtype)
            paddle.assign(new, shadow)
        self.num_updates += 1

    def state_dict(self):
        """Shadow weights as ``{state_dict name: Tensor}`` (loadable into the model)."""
        return dict(self.shadow)

    def set_state_dict(self, state_dict):
        """Restore the shadow from ``state_dict()`` output (tensors or numpy arrays)."""
        self._check_keys(state_dict, "set_state_dict")
        for name, value in state_dict.items():
            arr = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
            if tuple(arr.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"EMA set_state_dict: {name} has shape {list(arr.shape)}, "
                                 f"expected {list(self.shadow[name].shape)}")
            self.shadow[name] = paddle.to_tensor(arr.astype(self.shadow[name].numpy().dtype))
            self.shadow[name].stop_gradient = True

    @contextlib.contextmanager
    def apply_to(self, model):
        """Temporarily load the EMA weights into ``model`` (for eval/saving); restore on exit."""
        backup = {k: v.detach().clone() for k, v in model.state_dict(use_hook=False).items()}
        self._copy_into(model, self.shadow)
        try:
            yield model
        finally:
            self._copy_into(model, backup)

    def _copy_into(self, model, weights):
        state = model.state_dict(use_hook=False)
        self._check_keys(state, "apply_to")
        with paddle.no_grad():
            for name, target in state.items():
                paddle.assign(weights[name].astype(target.dtype), target)
