"""MobileNetV2 (x0_25 ... x2_0) with PaddleClas ``model_zoo`` state_dict keys.

Keys: ``conv1._conv.weight`` / ``conv1._batch_norm.*``, per stage ``conv{2..8}._first_block.*`` and
``conv{n}.conv{n}_{k}.*`` each with ``_expand_conv``, ``_bottleneck_conv``, ``_linear_conv``; then
``conv9.*`` (1x1 to 1280) and ``out.weight [1280, class_num]``, ``out.bias``
(``../shared/parity/MobileNetV2.keys.json``). PaddleClas keeps the 1x1 expand conv even where the
expansion factor is 1 (stage conv2), so we do too.

PaddleClas's MobileNetV2 has no ``lr_mult_list``; ours takes one multiplier per named stage,
``[conv1, conv2, ..., conv8, conv9]`` (9 values), so a stage can be frozen like in ResNet/PPLCNet.
"""
from typing import Optional

import paddle.nn as nn

from ..registry import MODELS
from .base import ClassifierBase
from .layers import (BatchNorm2D, Conv2D, batch_norm_act, check_class_num, check_lr_mult_list,
                     lr_attr)

# (expansion t, output channels c at scale 1, repeats n, first stride s) for conv2 ... conv8.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNLayer(nn.Layer):
    """``_conv`` (no bias) -> ``_batch_norm`` -> ReLU6 unless ``if_act=False`` is passed (the
    batch norm applies it, fused into its kernel where it can)."""

    def __init__(self, in_c, out_c, kernel_size, stride=1, groups=1, lr_mult=1.0):
        super().__init__()
        self._conv = Conv2D(in_c, out_c, kernel_size, stride=stride,
                            padding=(kernel_size - 1) // 2, groups=groups,
                            weight_attr=lr_attr(lr_mult), bias_attr=False)
        self._batch_norm = BatchNorm2D(out_c, weight_attr=lr_attr(lr_mult),
                                          bias_attr=lr_attr(lr_mult))

    def forward(self, x, if_act=True):
        return batch_norm_act(self._batch_norm, self._conv(x), "relu6" if if_act else None)


class InvertedResidualUnit(nn.Layer):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6, strided) -> 1x1 linear projection."""

    def __init__(self, in_c, out_c, stride, expansion, lr_mult):
        super().__init__()
        mid = int(round(in_c * expansion))
        self._expand_conv = ConvBNLayer(in_c, mid, 1, lr_mult=lr_mult)
        self._bottleneck_conv = ConvBNLayer(mid, mid, 3, stride=stride, groups=mid, lr_mult=lr_mult)
        self._linear_conv = ConvBNLayer(mid, out_c, 1, lr_mult=lr_mult)

    def forward(self, x, shortcut):
        y = self._linear_conv(self._bottleneck_conv(self._expand_conv(x)), if_act=False)
        return x + y if shortcut else y


class InvresiBlocks(nn.Layer):
    """One stage: ``_first_block`` (strided, no residual) then ``{name}_2 ... {name}_n`` (residual)."""

    def __init__(self, in_c, t, c, n, s, name, lr_mult):
        super().__init__()
        self._first_block = InvertedResidualUnit(in_c, c, s, t, lr_mult)
        self._repeats = []
        for i in range(2, n + 1):
            # add_sublayer gives the PaddleClas key names conv3.conv3_2.*, ...
            self._repeats.append(self.add_sublayer(f"{name}_{i}",
                                                   InvertedResidualUnit(c, c, 1, t, lr_mult)))

    def forward(self, x):
        x = self._first_block(x, shortcut=False)
        for block in self._repeats:
            x = block(x, shortcut=True)
        return x


class MobileNetV2Net(ClassifierBase):
    """MobileNetV2 backbone + ``out`` classifier; built through ``MobileNetV2``, ``MobileNetV2_x0_5``, ..."""

    classifier_prefixes = ("out.",)
    num_layer_ids = 10  # conv1 0, conv2..conv8 1..7, conv9 8, out 9

    def __init__(self, scale: float = 1.0, class_num: int = 1000,
                 lr_mult_list: Optional[list] = None):
        super().__init__()
        self.class_num = check_class_num(class_num)
        lr_mults = check_lr_mult_list(lr_mult_list, 9)
        self.scale = scale
        in_c = int(32 * scale)
        self.conv1 = ConvBNLayer(3, in_c, 3, stride=2, lr_mult=lr_mults[0])
        self._stage_names = []
        for i, (t, c, n, s) in enumerate(_STAGES):
            name = f"conv{i + 2}"
            self.add_sublayer(name, InvresiBlocks(in_c, t, int(c * scale), n, s, name, lr_mults[i + 1]))
            self._stage_names.append(name)
            in_c = int(c * scale)
        # PaddleClas widens the last conv only for scale > 1.
        self.num_features = int(1280 * scale) if scale > 1.0 else 1280
        self.conv9 = ConvBNLayer(in_c, self.num_features, 1, lr_mult=lr_mults[8])
        self.pool2d_avg = nn.AdaptiveAvgPool2D(1)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(self.num_features, self.class_num)

    def forward_features(self, x):
        x = self.conv1(x)
        for name in self._stage_names:
            x = getattr(self, name)(x)
        return self.flatten(self.pool2d_avg(self.conv9(x)))

    def forward_head(self, x):
        return self.out(x)

    def reset_classifier(self, class_num):
        self.class_num = check_class_num(class_num)
        self.out = nn.Linear(self.num_features, self.class_num)

    def layer_id(self, param_name):
        if self.is_classifier_key(param_name):
            return self.num_layer_ids - 1
        head = param_name.split(".")[0]
        # conv1 -> 0, conv2 -> 1, ..., conv9 -> 8
        return int(head[len("conv"):]) - 1 if head.startswith("conv") else 0


def _register(name, scale):
    def factory(class_num: int = 1000, lr_mult_list: Optional[list] = None) -> MobileNetV2Net:
        return MobileNetV2Net(scale=scale, class_num=class_num, lr_mult_list=lr_mult_list)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"``Arch: {{name: {name}, class_num: 1000, lr_mult_list: null}}``\n\n"
                       f"MobileNetV2 at width scale {scale}; lr_mult_list: 9 multipliers for "
                       f"conv1, conv2..conv8, conv9 (0 freezes a stage).")
    MODELS.register(factory, name=name)
    return factory


# Explicit module symbols, so `grep MobileNetV2_x0_5` finds the definition.
MobileNetV2 = _register("MobileNetV2", 1.0)
MobileNetV2_x0_25 = _register("MobileNetV2_x0_25", 0.25)
MobileNetV2_x0_5 = _register("MobileNetV2_x0_5", 0.5)
MobileNetV2_x0_75 = _register("MobileNetV2_x0_75", 0.75)
MobileNetV2_x1_5 = _register("MobileNetV2_x1_5", 1.5)
MobileNetV2_x2_0 = _register("MobileNetV2_x2_0", 2.0)
