"""Blocks shared by the CNN families (ResNet, PPLCNet) and the argument checks they all need.

* ``ConvBNAct``: conv (no bias) -> batch norm -> optional activation, with the sub-layer names
  ``conv`` / ``bn`` that both PaddleClas ResNet and PPLCNet use, so state_dict keys match
  (``stem.0.conv.weight``, ``blocks2.0.dw_conv.bn._mean``, ...).
* ``lr_attr``: the ``ParamAttr`` PaddleClas builds for ``lr_mult_list`` (Paddle optimizers multiply
  the step by ``param.optimize_attr['learning_rate']``, so 0 freezes a parameter's update).
* ``Conv2D``: ``nn.Conv2D`` whose depthwise and dense cases run ppcls_ft's CPU kernels (``kernels/``).
* ``Linear`` / ``add_broadcast``: a bias added over rows whose gradient is a matrix product.
* ``LayerNorm`` / ``GELU`` / ``Hardswish`` / ``BatchNorm2D``: Paddle's layers running ppcls_ft's CPU
  kernels.
* ``DropPath``: stochastic depth, for any family with residual branches (Swin uses it).
* ``check_lr_mult_list`` / ``check_stride_list``: validation that names ``Arch.<key>``.

MobileNetV2 keeps its own conv block because its PaddleClas keys are ``_conv`` / ``_batch_norm``.
"""
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn
from paddle import ParamAttr
from paddle.nn.initializer import KaimingNormal
from paddle.regularizer import L2Decay

from ..errors import ConfigError

def lr_attr(lr_mult: float = 1.0, no_decay: bool = False, initializer=None) -> ParamAttr:
    """ParamAttr with a learning-rate multiplier; ``no_decay`` pins L2 decay to 0 for this parameter
    (a parameter-level regularizer overrides the optimizer's, as in PaddleClas PPLCNet batch norm)."""
    return ParamAttr(learning_rate=float(lr_mult), initializer=initializer,
                     regularizer=L2Decay(0.0) if no_decay else None)


def _explicit_padding(conv):
    """An ``nn.Conv2D``'s padding as [top, bottom, left, right], from the form Paddle normalised
    it to at construction (``_updated_padding``: [ph, pw] or those four); None for "SAME" and
    "VALID", which Paddle's convolution keeps."""
    if conv._padding_algorithm != "EXPLICIT":
        return None
    pads = [int(p) for p in conv._updated_padding]
    return [pads[0], pads[0], pads[1], pads[1]] if len(pads) == 2 else pads


class Conv2D(nn.Conv2D):
    """``nn.Conv2D`` (same parameters, state_dict keys and parameter names: the class name is what
    Paddle derives the names from) running ppcls_ft's CPU kernels in dygraph on a float32 CPU
    tensor, for zero padding, no dilation and no bias:

    * the depthwise case (NCHW, groups == in == out channels, square stride, symmetric padding):
      ``kernels/depthwise_conv.cc``, 2-10x Paddle's on these cores;
    * the dense case (groups == 1), NCHW but for 1x1 with stride 1: ``kernels/onednn_conv.cc``,
      oneDNN's primitives, 3-4x Paddle's im2col convolution forward and backward;
    * every dense case on NHWC (``data_format="NHWC"``), 1x1 included: there oneDNN reads and
      writes the tensors as they are, with no layout reorder around it (Paddle's own CPU
      convolution transposes NHWC to NCHW and back).

    Anything else, and every static graph (export, ``paddle.jit``), is Paddle's own convolution."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, **kw):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, **kw)
        st, pad, dil = self._stride, self._padding, self._dilation
        self._channels_last = self._data_format == "NHWC"
        plain = (self.bias is None  # the kernels add no bias
                 and self._padding_mode == "zeros" and set(dil) == {1})
        self._depthwise = (plain and not self._channels_last
                           and groups == in_channels == out_channels and isinstance(pad, int)
                           and len(set(st)) == 1 and self._kernel_size[0] == self._kernel_size[1])
        # On NCHW 1x1 with stride 1 stays Paddle's: that is one MKL matrix product per image with
        # nothing to unroll, and oneDNN's layout reorders around it made MobileNetV2 train 15 %
        # and ResNet50 8 % slower (a step micro-benchmark, 2 cores, AMD EPYC)
        pointwise = (list(self._kernel_size) == [1, 1] and list(st) == [1, 1]
                     and not self._channels_last)
        self._pads = _explicit_padding(self) if plain and groups == 1 and not pointwise else None
        self._strides = [int(v) for v in st]  # the operator's attribute, made once

    @paddle.jit.not_to_static  # dygraph only: under paddle.jit it returns None untransformed
    def _kernel(self, x):
        """The compiled operator this call may take, bound to its arguments, or None."""
        if self._depthwise:
            dwconv = _cpu_op(x, "dwconv")
            if dwconv is not None:
                return lambda: dwconv(x, self.weight, int(self._stride[0]), int(self._padding))
        elif self._pads is not None:
            conv2d = _cpu_op(x, "conv2d")
            if conv2d is not None:
                return lambda: conv2d(x, self.weight, self._strides, self._pads,
                                      self._channels_last)
        return None

    def forward(self, x):
        # no name bound in a branch here: paddle.jit turns this method into a graph, and a
        # variable set in one branch only made it warn ("maybe unbound local variable") per layer
        run = self._kernel(x)
        if run is None:
            return super().forward(x)
        return run()


def _dygraph_cpu_float32(*tensors):
    """Whether every tensor may take a CPU fast path: dygraph, on the CPU, float32. Static graphs
    (exports, ``paddle.jit``), GPUs and AMP dtypes keep Paddle's own operators."""
    return paddle.in_dynamic_mode() and all(
        t.dtype == paddle.float32 and t.place.is_cpu_place() for t in tensors)


def _cpu_op(x, name):
    """ppcls_ft's compiled CPU operator ``name`` (``kernels.OPS``) when ``x`` may use it
    (``_dygraph_cpu_float32``, not empty, and its library built), else None. Asked in that order:
    under ``paddle.jit`` the first is False and the rest is never evaluated (a batch dimension of
    a static graph is a tensor, and a condition on it would put a cond op in the export)."""
    if _dygraph_cpu_float32(x) and x.size > 0:
        from ..kernels import op
        return op(name)
    return None


def _rows_plus(x, b, rows):
    """``x + b`` as ``addmm(x, ones, b)``: a rank-1 product that MKL adds onto x, 4 ms on these
    cores where Paddle's broadcast add takes 10 ([25088, 384]); the same floats (x + 1 * b)."""
    ones = paddle.ones([rows, 1], dtype=x.dtype)
    return paddle.addmm(x.reshape([rows, -1]), ones, b.reshape([1, -1])).reshape(x.shape)


class _AddBroadcast(paddle.autograd.PyLayer):
    """``x + b`` where ``b`` repeats over x's leading axes; b's gradient is ``ones @ dy``.

    Why: Paddle 3.3.1's CPU gradient of a broadcast add sums ``dy`` over the repeated axes with
    its generic reduction, which on these cores takes 72 ms for a [25088, 384] gradient that MKL's
    matrix-vector product sums in 0.8 ms: a Linear's bias cost 4x its matrix product, and the bias
    adds were a fifth of a Swin-T training step (docs/benchmarks/train_speed.md)."""

    @staticmethod
    def forward(ctx, x, b, rows):
        ctx.rows, ctx.b_shape, ctx.x_grad = rows, b.shape, not x.stop_gradient
        return _rows_plus(x, b, rows)

    @staticmethod
    def backward(ctx, dy):
        ones = paddle.ones([1, ctx.rows], dtype=dy.dtype)
        db = paddle.matmul(ones, dy.reshape([ctx.rows, -1])).reshape(ctx.b_shape)
        return (dy if ctx.x_grad else None), db


def add_broadcast(x, b):
    """``x + b`` for a ``b`` whose shape is x's trailing axes (optionally led by 1s), the fast way
    in dygraph on a float32 CPU tensor. Static graphs (so exports), other devices, dtypes and
    shapes get the plain add; the values are the same either way."""
    trailing = list(b.shape)
    while len(trailing) > 1 and trailing[0] == 1:
        trailing = trailing[1:]
    # on a GPU Paddle's broadcast add is fine; under AMP the addmm would promote to float32 and
    # hand an fp16 x a float32 gradient
    if (not _dygraph_cpu_float32(x, b) or len(b.shape) > len(x.shape)
            or list(x.shape[len(x.shape) - len(trailing):]) != trailing):
        return x + b
    rows = int(np.prod(x.shape)) // int(np.prod(trailing))
    if not paddle.is_grad_enabled() or (x.stop_gradient and b.stop_gradient):
        return _rows_plus(x, b, rows)
    if b.stop_gradient:  # x's gradient is dy itself: nothing to sum
        return x + b
    return _AddBroadcast.apply(x, b, rows)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and keys: Paddle derives the names from the class
    name) whose bias is added by ``add_broadcast``."""

    def forward(self, x):
        # static graphs (exports) and GPUs keep Paddle's linear (fused on a GPU)
        if self.bias is None or not _dygraph_cpu_float32(x):
            return super().forward(x)
        return add_broadcast(paddle.matmul(x, self.weight), self.bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, names and keys) over the last axis, running ppcls_ft's
    CPU kernel (``kernels/norm_act.cc``: its backward 10x Paddle's on these cores) where
    ``_cpu_op`` allows and the layer has both scale and shift; Paddle's otherwise."""

    def forward(self, x):
        if len(self._normalized_shape) == 1 and self.weight is not None and self.bias is not None:
            layer_norm = _cpu_op(x, "layer_norm")
            if layer_norm is not None:
                return layer_norm(x, self.weight, self.bias, self._epsilon)
        return super().forward(x)


class GELU(nn.GELU):
    """``nn.GELU`` whose exact (erf) form runs ppcls_ft's CPU kernel where ``_cpu_op``
    allows (forward 3x, backward 4x Paddle's); the tanh approximation is Paddle's."""

    def forward(self, x):
        if not self._approximate:
            gelu = _cpu_op(x, "gelu")
            if gelu is not None:
                return gelu(x)
        return super().forward(x)


def hardswish(x):
    """``F.hardswish`` on ppcls_ft's CPU kernel where ``_cpu_op`` allows."""
    kernel = _cpu_op(x, "hardswish")
    return nn.functional.hardswish(x) if kernel is None else kernel(x)


# The activations a ConvBNAct (or a BatchNorm2D called with ``act``) may apply; the batch-norm
# kernel fuses each of them (kernels/norm_act.cc).
ACTIVATIONS = {"relu": nn.functional.relu, "relu6": nn.functional.relu6, "hardswish": hardswish}


class Hardswish(nn.Hardswish):
    """``nn.Hardswish`` on ppcls_ft's CPU kernel where ``_cpu_op`` allows (forward 2x,
    backward 3x Paddle's; PPLCNet trains 1.22x faster)."""

    def forward(self, x):
        return hardswish(x)


class BatchNorm2D(nn.BatchNorm2D):
    """``nn.BatchNorm2D`` (same parameters, buffers, names and keys) whose training-mode forward
    with batch statistics runs ppcls_ft's CPU kernel (forward and backward 3x Paddle's) where
    ``_cpu_op`` allows, NCHW or NHWC, with scale and shift. The running statistics are updated as
    Paddle does: ``running = momentum * running + (1 - momentum) * batch``, with the biased batch
    variance. Evaluation, global statistics (``FineTune.freeze_bn_stats`` puts the layer in eval
    mode), and everything else are Paddle's.

    ``act`` (a key of ``ACTIVATIONS``) applies that activation to the output: inside the kernel
    when it runs (no pass over memory and no saved activation of its own; a MobileNetV2 step
    1.12x faster), after Paddle's batch norm otherwise."""

    def forward(self, x, act: Optional[str] = None):
        if act is not None and act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)} or None, got {act!r}")
        if (self.training and not self._use_global_stats and self._data_format in ("NCHW", "NHWC")
                and self.weight is not None and self.bias is not None):
            batch_norm = _cpu_op(x, "batch_norm")
            if batch_norm is not None:
                out, mean, var = batch_norm(x, self.weight, self.bias, self._epsilon, act or "",
                                            self._data_format == "NHWC")
                with paddle.no_grad():
                    m = self._momentum
                    paddle.assign(self._mean * m + mean * (1.0 - m), output=self._mean)
                    paddle.assign(self._variance * m + var * (1.0 - m), output=self._variance)
                return out
        out = super().forward(x)
        return ACTIVATIONS[act](out) if act else out


def batch_norm_act(bn, x, act):
    """``bn`` then ``act`` (a key of ``ACTIVATIONS`` or None): fused when ``bn`` is a
    BatchNorm2D, one after the other when it is not (``Arch.use_sync_bn`` swaps it for
    ``nn.SyncBatchNorm``, whose forward takes the input only)."""
    if isinstance(bn, BatchNorm2D):
        return bn(x, act)
    x = bn(x)
    return ACTIVATIONS[act](x) if act else x


class ConvBNAct(nn.Layer):
    """``conv`` (bias-free) -> ``bn`` -> activation (``"relu"``, ``"hardswish"``, ``"relu6"`` or None,
    applied by ``bn``, which fuses it into its kernel where it can).

    ``padding`` is ``(kernel_size - 1) // 2``; ``stride`` may be an int or ``[sh, sw]`` (PPLCNet
    text-line models use ``[2, 1]``). ``bn_no_decay`` marks the batch-norm scale/shift as carrying
    no weight decay; ``kaiming_init`` uses KaimingNormal for the conv (PPLCNet).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1,
                 groups: int = 1, act: Optional[str] = None, lr_mult: float = 1.0,
                 bn_no_decay: bool = False, kaiming_init: bool = False,
                 data_format: str = "NCHW"):
        super().__init__()
        if act is not None and act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)} or None, got {act!r}")
        init = KaimingNormal() if kaiming_init else None
        self.conv = Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                           padding=(kernel_size - 1) // 2, groups=groups,
                           weight_attr=lr_attr(lr_mult, initializer=init), bias_attr=False,
                           data_format=data_format)
        self.bn = BatchNorm2D(out_channels, weight_attr=lr_attr(lr_mult, bn_no_decay),
                                 bias_attr=lr_attr(lr_mult, bn_no_decay), data_format=data_format)
        self.act = act

    def forward(self, x):
        return batch_norm_act(self.bn, self.conv(x), self.act)

    def extra_repr(self):
        return f"act={self.act}"


class DropPath(nn.Layer):
    """Stochastic depth: zero a whole sample's residual branch with probability ``drop_prob`` in
    training and rescale the kept ones by ``1 / (1 - drop_prob)``; identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)  # one draw per sample
        mask = paddle.floor(keep + paddle.rand(shape, dtype=x.dtype))
        return x / keep * mask

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def check_lr_mult_list(value, length: int, path: str = "Arch.lr_mult_list") -> tuple:
    """Return ``value`` (or ``length`` ones when None) as a tuple of floats; raise ConfigError when
    it is not a list of ``length`` non-negative numbers."""
    if value is None:
        return (1.0,) * length
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ConfigError(path, f"must be a list of {length} learning-rate multipliers "
                                f"(one per stage, 0 freezes a stage), got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{path}.{i}", f"must be a number >= 0, got {v!r}")
        out.append(float(v))
    return tuple(out)


def check_stride_list(value, length: int, default: int = 2, allow_pairs: bool = False,
                      path: str = "Arch.stride_list") -> tuple:
    """Return ``value`` (or ``length`` times ``default``) as a tuple of strides; each stride is a
    positive int, or with ``allow_pairs`` also ``[stride_h, stride_w]``."""
    if value is None:
        return (default,) * length
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ConfigError(path, f"must be a list of {length} strides, got {value!r}")
    out = []
    for i, s in enumerate(value):
        pair = isinstance(s, (list, tuple))
        items = list(s) if pair else [s]
        ok = (not pair or (allow_pairs and len(items) == 2)) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)
        if not ok:
            kinds = "a positive int or [stride_h, stride_w]" if allow_pairs else "a positive int"
            raise ConfigError(f"{path}.{i}", f"must be {kinds}, got {s!r}")
        out.append(tuple(items) if pair else s)
    return tuple(out)


def check_class_num(class_num, path: str = "Arch.class_num") -> int:
    """A classifier needs at least one output."""
    if isinstance(class_num, bool) or not isinstance(class_num, int) or class_num < 1:
        raise ConfigError(path, f"must be a positive int (number of classes), got {class_num!r}")
    return class_num
