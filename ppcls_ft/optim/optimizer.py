"""Optimizers of the PaddleClas YAML (``Optimizer``): Momentum, SGD, Adam, AdamW, RMSProp.

Each registered class is a small recipe: its constructor holds the validated YAML keys, and
``build(model, lr_scheduler, layer_decay)`` returns a ``paddle.optimizer`` built over **parameter
groups**. A group is a set of parameters with the same (decay rule, lr multiplier):

- Decay. ``regularizer: {name: L2|L1, coeff}`` (or a float ``weight_decay``) is *coupled* decay
  (Momentum/SGD/Adam/RMSProp); AdamW's ``weight_decay`` is decoupled and is switched off per
  parameter with ``apply_decay_param_fun``. ``no_weight_decay_name`` (space-separated substrings of
  the structured names of ``model.named_parameters()``, e.g. ``layers.0.blocks.0.norm1.weight``)
  and ``one_dim_param_no_weight_decay`` (every 1-D tensor: biases, norm scales) exempt parameters.
  A regularizer the model itself declared through ``ParamAttr`` (PPLCNet's batch norms carry
  ``L2Decay(0.0)``) wins over the optimizer's, as in PaddleClas.
- Learning rate. The lr multiplier a model sets in ``param.optimize_attr['learning_rate']``
  (PaddleClas ``lr_mult_list``) is multiplied by the layer-wise decay factor
  ``layer_decay ** (model.num_layer_ids - 1 - model.layer_id(name))`` (our fine-tuning extension)
  and given to Paddle as the group's ``learning_rate``. Paddle writes that value back into
  ``optimize_attr``, so the model's own multiplier is remembered on the parameter the first time
  (``_ppcls_ft_lr_mult``) and rebuilding an optimizer never compounds it.

Frozen parameters (``stop_gradient=True``) are still handed to the optimizer: Paddle skips
parameters without a gradient in ``step()``, so a later unfreeze only has to flip
``stop_gradient`` (tests/test_optimizer.py checks this). Batch-norm running statistics, which
Paddle also stores as parameters, are left out: they are never optimised, even if a strategy
flips their ``stop_gradient``.

``clip_norm`` clips the *global* gradient norm (``paddle.nn.ClipGradByGlobalNorm``), as the
recipes we follow (Swin, timm) mean it. Differs from PaddleClas: there ``clip_norm`` clips each
tensor separately (``ClipGradByNorm``) and ``clip_norm_global`` clips the global norm; we accept
``clip_norm_global`` as a synonym so those configs build unchanged.
"""
import logging
from collections import OrderedDict
from typing import Optional, Union

import paddle
from paddle.optimizer.lr import LRScheduler

from ..errors import ConfigError, WeightsError
from ..registry import OPTIMIZERS
from .ema import running_stat_names

_LOG = logging.getLogger("ppcls_ft")
_NO_DECAY = "no-decay"  # group key for exempt parameters


def _base_attrs(param):
    """The model's own (lr multiplier, regularizer) of ``param``, recorded before we change them."""
    if not hasattr(param, "_ppcls_ft_lr_mult"):
        param._ppcls_ft_lr_mult = float((param.optimize_attr or {}).get("learning_rate", 1.0))
        param._ppcls_ft_regularizer = getattr(param, "regularizer", None)
    return param._ppcls_ft_lr_mult, param._ppcls_ft_regularizer


def _make_regularizer(regularizer, weight_decay, path):
    """YAML ``regularizer``/``weight_decay`` -> ``paddle.regularizer`` object or None."""
    if regularizer is not None and weight_decay is not None:
        raise ConfigError(path, "set either regularizer: {name: L2, coeff: ...} or weight_decay, not both")
    if weight_decay is not None:
        if weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay", f"must be >= 0, got {weight_decay}")
        return paddle.regularizer.L2Decay(float(weight_decay))
    if regularizer is None:
        return None
    extra = set(regularizer) - {"name", "coeff"}
    if extra:
        raise ConfigError(f"{path}.regularizer", f"unknown keys {sorted(extra)}; valid keys: name, coeff")
    kind = str(regularizer.get("name", "")).strip()
    coeff = regularizer.get("coeff", 0.0)
    if not isinstance(coeff, (int, float)) or isinstance(coeff, bool) or coeff < 0:
        raise ConfigError(f"{path}.regularizer.coeff", f"must be a number >= 0, got {coeff!r}")
    if kind in ("L2", "L2Decay"):
        return paddle.regularizer.L2Decay(float(coeff))
    if kind in ("L1", "L1Decay"):
        return paddle.regularizer.L1Decay(float(coeff))
    raise ConfigError(f"{path}.regularizer.name", f"must be L2 or L1, got {kind!r}")


class OptimizerRecipe:
    """Shared part of every registered optimizer: decay exemptions, lr multipliers, clipping."""

    decoupled_decay = False  # True for AdamW: decay handled by apply_decay_param_fun

    def _common(self, no_weight_decay_name, one_dim_param_no_weight_decay, clip_norm,
                clip_norm_global, multi_precision, regularizer=None, weight_decay=None):
        if clip_norm is not None and clip_norm_global is not None:
            raise ConfigError("clip_norm_global", "both clip_norm and clip_norm_global are set; both "
                                                  "clip the global norm here, keep one")
        clip_norm = clip_norm if clip_norm is not None else clip_norm_global
        if clip_norm is not None and clip_norm <= 0:
            raise ConfigError("clip_norm", f"must be > 0 (global gradient norm), got {clip_norm}")
        self.no_decay_names = str(no_weight_decay_name or "").split()
        self.one_dim_no_decay = bool(one_dim_param_no_weight_decay)
        self.clip_norm = clip_norm
        self.multi_precision = bool(multi_precision)
        self._reg_cfg = (regularizer, weight_decay)

    def is_exempt(self, name, param):
        """True when ``param`` (structured ``name``) must not be decayed."""
        if any(sub in name for sub in self.no_decay_names):  # PaddleClas: substring match
            return True
        return self.one_dim_no_decay and len(param.shape) == 1

    def param_groups(self, model, layer_decay=None, path="Optimizer"):
        """List of Paddle parameter-group dicts (``params``, ``learning_rate``[, ``weight_decay``])."""
        reg = None if self.decoupled_decay else _make_regularizer(*self._reg_cfg, path)
        groups = OrderedDict()
        self.decay_param_names = set()  # Paddle unique names (param.name) that get decay
        stats = running_stat_names(model)  # BN _mean/_variance are Paddle parameters; never optimise
        for name, param in model.named_parameters():
            if name in stats:
                continue
            mult, own_reg = _base_attrs(param)
            if layer_decay is not None:
                mult *= layer_decay ** (model.num_layer_ids - 1 - model.layer_id(name))
            exempt = self.is_exempt(name, param)
            if not exempt:
                self.decay_param_names.add(param.name)
            if self.decoupled_decay:
                param.regularizer = own_reg  # undo what an earlier coupled build may have set
                key = (None, mult)
            elif exempt:  # the user's exemption wins over any regularizer
                key = (_NO_DECAY, mult)
            else:
                key = (own_reg if own_reg is not None else reg, mult)
            groups.setdefault(key, []).append(param)
        out = []
        for (decay, mult), params in groups.items():
            group = {"params": params, "learning_rate": float(mult)}
            if not self.decoupled_decay:
                # 0.0 = L2Decay(0): an explicit "no decay" that also overrides a ParamAttr regularizer
                group["weight_decay"] = 0.0 if decay is _NO_DECAY else decay
            out.append(group)
        return out

    def grad_clip(self):
        return None if self.clip_norm is None else paddle.nn.ClipGradByGlobalNorm(float(self.clip_norm))

    def make(self, groups, lr):
        """Construct the paddle optimizer from ready groups (subclasses)."""
        raise NotImplementedError

    def build(self, model, lr_scheduler, layer_decay=None, path="Optimizer"):
        groups = self.param_groups(model, layer_decay, path)
        if not groups:
            raise ConfigError(path, "the model has no parameters to optimise")
        return self.make(groups, lr_scheduler)


@OPTIMIZERS.register
class Momentum(OptimizerRecipe):
    """SGD with (Nesterov) momentum and coupled L2/L1 decay.

    YAML: ``Optimizer: {name: Momentum, momentum: 0.9, use_nesterov: false,
    regularizer: {name: L2, coeff: 1e-4}, no_weight_decay_name: "bn", clip_norm: null}``.
    """

    def __init__(self, momentum: float = 0.9, use_nesterov: bool = False,
                 regularizer: Optional[dict] = None, weight_decay: Optional[float] = None,
                 no_weight_decay_name: Optional[str] = None,
                 one_dim_param_no_weight_decay: bool = False, clip_norm: Optional[float] = None,
                 clip_norm_global: Optional[float] = None,
                 multi_precision: bool = False):
        self._common(no_weight_decay_name, one_dim_param_no_weight_decay, clip_norm, clip_norm_global,
                     multi_precision, regularizer, weight_decay)
        self.momentum = float(momentum)
        self.use_nesterov = bool(use_nesterov)

    def make(self, groups, lr):
        return paddle.optimizer.Momentum(
            learning_rate=lr, momentum=self.momentum, parameters=groups,
            use_nesterov=self.use_nesterov, weight_decay=None, grad_clip=self.grad_clip(),
            multi_precision=self.multi_precision)


@OPTIMIZERS.register
class SGD(OptimizerRecipe):
    """Plain SGD with coupled decay.

    YAML: ``Optimizer: {name: SGD, regularizer: {name: L2, coeff: 1e-4}}``.
    """

    def __init__(self, regularizer: Optional[dict] = None, weight_decay: Optional[float] = None,
                 no_weight_decay_name: Optional[str] = None,
                 one_dim_param_no_weight_decay: bool = False, clip_norm: Optional[float] = None,
                 clip_norm_global: Optional[float] = None,
                 multi_precision: bool = False):
        self._common(no_weight_decay_name, one_dim_param_no_weight_decay, clip_norm, clip_norm_global,
                     multi_precision, regularizer, weight_decay)

    def make(self, groups, lr):
        return paddle.optimizer.SGD(learning_rate=lr, parameters=groups, weight_decay=None,
                                    grad_clip=self.grad_clip(), multi_precision=self.multi_precision)


@OPTIMIZERS.register
class Adam(OptimizerRecipe):
    """Adam with coupled L2 (``weight_decay`` float or ``regularizer``), as PaddleClas's Adam.

    YAML: ``Optimizer: {name: Adam, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 1e-4}``.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: Optional[float] = None, regularizer: Optional[dict] = None,
                 no_weight_decay_name: Optional[str] = None,
                 one_dim_param_no_weight_decay: bool = False, clip_norm: Optional[float] = None,
                 clip_norm_global: Optional[float] = None,
                 lazy_mode: bool = False, amsgrad: bool = False, multi_precision: bool = False):
        self._common(no_weight_decay_name, one_dim_param_no_weight_decay, clip_norm, clip_norm_global,
                     multi_precision, regularizer, weight_decay)
        self.betas = (float(beta1), float(beta2))
        self.epsilon = float(epsilon)
        self.lazy_mode = bool(lazy_mode)
        self.amsgrad = bool(amsgrad)

    def make(self, groups, lr):
        return paddle.optimizer.Adam(
            learning_rate=lr, beta1=self.betas[0], beta2=self.betas[1], epsilon=self.epsilon,
            parameters=groups, weight_decay=None, grad_clip=self.grad_clip(),
            lazy_mode=self.lazy_mode, multi_precision=self.multi_precision, amsgrad=self.amsgrad)


@OPTIMIZERS.register
class AdamW(OptimizerRecipe):
    """Adam with decoupled weight decay (Loshchilov & Hutter); exemptions via apply_decay_param_fun.

    YAML: ``Optimizer: {name: AdamW, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.05,
    no_weight_decay_name: "absolute_pos_embed relative_position_bias_table .bias norm",
    one_dim_param_no_weight_decay: true, clip_norm: 5.0}``.
    """

    decoupled_decay = True

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: float = 0.0, no_weight_decay_name: Optional[str] = None,
                 one_dim_param_no_weight_decay: bool = False, clip_norm: Optional[float] = None,
                 clip_norm_global: Optional[float] = None,
                 amsgrad: bool = False, multi_precision: bool = False):
        if weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {weight_decay}")
        self._common(no_weight_decay_name, one_dim_param_no_weight_decay, clip_norm, clip_norm_global,
                     multi_precision)
        self.betas = (float(beta1), float(beta2))
        self.epsilon = float(epsilon)
        self.weight_decay = float(weight_decay)
        self.amsgrad = bool(amsgrad)

    def make(self, groups, lr):
        decay_names = frozenset(self.decay_param_names)  # snapshot: Paddle calls this per step
        return paddle.optimizer.AdamW(
            learning_rate=lr, beta1=self.betas[0], beta2=self.betas[1], epsilon=self.epsilon,
            parameters=groups, weight_decay=self.weight_decay,
            apply_decay_param_fun=lambda pname: pname in decay_names,
            grad_clip=self.grad_clip(), multi_precision=self.multi_precision, amsgrad=self.amsgrad)


@OPTIMIZERS.register
class RMSProp(OptimizerRecipe):
    """RMSProp with coupled decay.

    YAML: ``Optimizer: {name: RMSProp, rho: 0.95, momentum: 0.0, epsilon: 1e-6,
    regularizer: {name: L2, coeff: 1e-5}}``.
    """

    def __init__(self, rho: float = 0.95, momentum: float = 0.0, epsilon: float = 1e-6,
                 centered: bool = False, regularizer: Optional[dict] = None,
                 weight_decay: Optional[float] = None, no_weight_decay_name: Optional[str] = None,
                 one_dim_param_no_weight_decay: bool = False, clip_norm: Optional[float] = None,
                 clip_norm_global: Optional[float] = None,
                 multi_precision: bool = False):
        self._common(no_weight_decay_name, one_dim_param_no_weight_decay, clip_norm, clip_norm_global,
                     multi_precision, regularizer, weight_decay)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.centered = bool(centered)

    def make(self, groups, lr):
        if self.multi_precision:
            _LOG.info("Optimizer.multi_precision: Paddle's RMSProp has no master weights; ignored")
        return paddle.optimizer.RMSProp(
            learning_rate=lr, rho=self.rho, epsilon=self.epsilon, momentum=self.momentum,
            centered=self.centered, parameters=groups, weight_decay=None,
            grad_clip=self.grad_clip())


def _check_layer_decay(model, layer_decay, path):
    if layer_decay is None:
        return None
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) \
            or not 0 < layer_decay <= 1:
        raise ConfigError(f"{path}.layer_decay", f"must be a number in (0, 1], got {layer_decay!r}")
    if not (hasattr(model, "layer_id") and hasattr(model, "num_layer_ids")):
        raise ConfigError(f"{path}.layer_decay", f"{type(model).__name__} has no layer_id()/"
                                                 "num_layer_ids; remove layer_decay for this model")
    return float(layer_decay)


def _reroot(err, path):
    """A recipe's ConfigError names a key of the section; prefix it with the section path."""
    msg = str(err)
    if err.path and msg.startswith(f"{err.path}: "):
        msg = msg[len(err.path) + 2:]
    return ConfigError(f"{path}.{err.path}" if err.path else path, msg)


def build_optimizer(opt_cfg: dict, model, lr_scheduler: Union[LRScheduler, float], *,
                    path: str = "Optimizer", layer_decay: Optional[float] = None):
    """Build ``Optimizer`` over ``model``'s parameters, driven by ``lr_scheduler``.

    The ``lr`` key is the caller's (see ``build_lr_scheduler``) and is ignored here.
    ``layer_decay`` may also be written as ``Optimizer.layer_decay``.
    """
    if not isinstance(opt_cfg, dict) or "name" not in opt_cfg:
        raise ConfigError(path, "must be a mapping with a 'name' (e.g. {name: Momentum, momentum: 0.9}); "
                                f"choices: {', '.join(OPTIMIZERS.names())}")
    kwargs = {k: v for k, v in opt_cfg.items() if k not in ("name", "lr", "layer_decay")}
    if opt_cfg.get("layer_decay") is not None:
        if layer_decay is not None and layer_decay != opt_cfg["layer_decay"]:
            raise ConfigError(f"{path}.layer_decay", f"{opt_cfg['layer_decay']} conflicts with the "
                                                     f"layer_decay={layer_decay} passed by the caller")
        layer_decay = opt_cfg["layer_decay"]
    layer_decay = _check_layer_decay(model, layer_decay, path)
    try:
        recipe = OPTIMIZERS.build(opt_cfg["name"], kwargs, path)
        return recipe.build(model, lr_scheduler, layer_decay, path)
    except ConfigError as err:
        if str(err.path).startswith(path):
            raise
        raise _reroot(err, path) from None


def optimizer_params(optimizer):
    """Every parameter an optimizer updates, whether it was built with groups or a plain list."""
    groups = optimizer._param_groups
    if groups and isinstance(groups[0], dict):
        return [p for g in groups for p in g["params"]]
    return list(groups)


def materialize_accumulators(optimizer):
    """Create every parameter's optimizer state now, with the values a first update would start
    from (zero velocity and moments, beta powers at beta).

    Paddle creates this state lazily, at a parameter's first update, and once a state has been
    loaded it refuses to create one the loaded state lacks ("Optimizer set error, ... should in
    state dict"). Without this, a checkpoint taken while ``FineTune`` froze the backbone (no
    backbone state yet) could never resume past the unfreeze. ``_create_accumulators`` is the
    hook every Paddle optimizer implements for exactly this; no public API does it.
    """
    from paddle.base import framework
    params = optimizer_params(optimizer)
    block = framework.default_main_program().global_block()
    optimizer._create_accumulators(block, params)


def _state_keys(state):
    return {k for k in state if k not in ("LR_Scheduler", "master_weights")}


def load_optimizer_state(optimizer, state, where, strict=True):
    """Restore ``optimizer`` from a ``.pdopt`` state; returns a note when something was left out.

    Call it after the model weights are restored. Every accumulator (``<param name>_velocity_0``,
    ``_moment1_0``, ...) must be there with its shape: Paddle's own ``set_state_dict`` warns and
    skips, or fails on an ``assert``, and a half-restored optimizer trains differently in
    silence. ``strict=False`` (a PaddleClas checkpoint, whose generated names may differ from
    ours) restores only the LR schedule then.

    AMP O2 master weights (fp32 copies of fp16 parameters) are written into the optimizer's own
    master tensors, never handed to ``set_state_dict``: it would replace them with the unnamed
    tensors a checkpoint reader makes, and Paddle finds accumulators by the master's name.
    Without saved masters they are re-derived from the restored parameters, or the first step
    would overwrite the resumed weights with the masters made from the pretrained ones.
    """
    import numpy as np
    from ..utils.safe_pickle import to_tensors
    masters = getattr(optimizer, "_master_weights", None) or {}
    _masters_from_params(optimizer, masters)
    saved_masters = state.get("master_weights") or {}
    own = optimizer.state_dict()
    missing = sorted(_state_keys(own) - _state_keys(state))
    extra = sorted(_state_keys(state) - _state_keys(own))
    shapes = [k for k in _state_keys(own) & _state_keys(state)
              if tuple(own[k].shape) != tuple(np.shape(state[k]))]
    if saved_masters and set(saved_masters) != set(masters):
        missing += sorted(f"master_weights/{k}" for k in set(masters) - set(saved_masters))
        extra += sorted(f"master_weights/{k}" for k in set(saved_masters) - set(masters))
    if not (missing or extra or shapes):
        optimizer.set_state_dict(to_tensors({k: v for k, v in state.items() if k != "master_weights"}))
        for name, value in saved_masters.items():
            masters[name].set_value(np.asarray(value, np.float32))
        return None
    detail = (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)}), "
              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)}), "
              f"wrong-shaped {shapes[:3]}")
    if strict:
        raise WeightsError(f"{where}: the optimizer state does not fit this optimizer: {detail}; "
                           "was it written with another Optimizer.name, model or FineTune setting?")
    if "LR_Scheduler" in state and hasattr(optimizer._learning_rate, "set_state_dict"):
        optimizer._learning_rate.set_state_dict(state["LR_Scheduler"])
    return f"optimizer state not restored (names differ: {detail}); the LR schedule was"


def _masters_from_params(optimizer, masters):
    """Set each fp32 master weight to its (restored) low-precision parameter."""
    if not masters:
        return
    params = optimizer_params(optimizer)
    for p in params:
        if p.name in masters:
            masters[p.name].set_value(p.astype("float32"))
