"""PP-LCNet x0_25 ... x2_5 with PaddleClas ``legendary_models`` state_dict keys.

Keys: ``conv1.{conv,bn}.*``, ``blocks{2..6}.{i}.{dw_conv, se.conv1, se.conv2, pw_conv}.*``,
``last_conv.weight`` (1x1 conv, no bias, no BN) and ``fc.*`` (``../shared/parity/PPLCNet_x1_0.keys.json``).

Head split for the model contract: ``forward_features`` ends after pool -> last_conv -> hardswish ->
dropout -> flatten, so ``forward_head`` is exactly ``fc`` (the keys in ``classifier_prefixes``).
The dropout is Paddle ``downscale_in_infer``: it multiplies by ``1 - p`` at eval time; official
weights and the parity logits depend on it (without it logits are off by 1/0.8).

Unlike PaddleClas, ``stride_list`` does not rewrite a module-global table (there, building a
text-line model changed the strides of every PPLCNet built afterwards in the same process).
"""
from typing import Optional

import paddle.nn as nn

from ..errors import ConfigError
from ..registry import MODELS
from .base import ClassifierBase
from .layers import (ConvBNAct, Hardswish, check_class_num, check_lr_mult_list, check_stride_list,
                     lr_attr)

# Per stage: blocks of (dw kernel, in channels, out channels, use SE) at scale 1.0. The first block
# of blocks3..blocks6 takes its stride from stride_list[1:], every other block has stride 1.
_STAGES = (
    ("blocks2", ((3, 16, 32, False),)),
    ("blocks3", ((3, 32, 64, False), (3, 64, 64, False))),
    ("blocks4", ((3, 64, 128, False), (3, 128, 128, False))),
    ("blocks5", ((3, 128, 256, False),) + ((5, 256, 256, False),) * 5),
    ("blocks6", ((5, 256, 512, True), (5, 512, 512, True))),
)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without dropping more than 10 %."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SEModule(nn.Layer):
    """Squeeze-excitation with 1x1 convs ``conv1`` (C -> C/4, ReLU) and ``conv2`` (-> C, hardsigmoid)."""

    def __init__(self, channels, reduction=4, lr_mult=1.0):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(channels, channels // reduction, 1,
                               weight_attr=lr_attr(lr_mult), bias_attr=lr_attr(lr_mult))
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2D(channels // reduction, channels, 1,
                               weight_attr=lr_attr(lr_mult), bias_attr=lr_attr(lr_mult))
        self.hardsigmoid = nn.Hardsigmoid()  # Paddle's: relu6(x + 3) / 6, as PaddleClas

    def forward(self, x):
        w = self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))
        return x * w


class DepthwiseSeparable(nn.Layer):
    """``dw_conv`` (depthwise k x k, strided) -> optional ``se`` -> ``pw_conv`` (1x1), all hardswish."""

    def __init__(self, in_c, out_c, stride, dw_size, use_se, lr_mult):
        super().__init__()
        common = dict(act="hardswish", lr_mult=lr_mult, bn_no_decay=True, kaiming_init=True)
        self.dw_conv = ConvBNAct(in_c, in_c, dw_size, stride=stride, groups=in_c, **common)
        self.se = SEModule(in_c, lr_mult=lr_mult) if use_se else None
        self.pw_conv = ConvBNAct(in_c, out_c, 1, **common)

    def forward(self, x):
        x = self.dw_conv(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw_conv(x)


class PPLCNet(ClassifierBase):
    """PP-LCNet backbone + ``last_conv`` + ``fc``; built through ``PPLCNet_x1_0`` etc.

    ``lr_mult_list`` = [conv1, blocks2, ..., blocks6]; ``stride_list`` = [conv1, blocks3..blocks6],
    each an int or ``[stride_h, stride_w]``.
    """

    classifier_prefixes = ("fc.",)

    def __init__(self, scale: float = 1.0, class_num: int = 1000, dropout_prob: float = 0.2,
                 class_expand: int = 1280, lr_mult_list: Optional[list] = None,
                 stride_list: Optional[list] = None, use_last_conv: bool = True):
        super().__init__()
        self.class_num = check_class_num(class_num)
        lr_mults = check_lr_mult_list(lr_mult_list, 6)
        strides = check_stride_list(stride_list, 5, allow_pairs=True)
        if not 0.0 <= dropout_prob < 1.0:
            raise ConfigError("Arch.dropout_prob", f"must be in [0, 1), got {dropout_prob!r}")
        self.scale = scale

        self.conv1 = ConvBNAct(3, make_divisible(16 * scale), 3, stride=strides[0], act="hardswish",
                               lr_mult=lr_mults[0], bn_no_decay=True, kaiming_init=True)
        for s, (stage_name, blocks) in enumerate(_STAGES):
            layers = []
            for i, (k, in_c, out_c, use_se) in enumerate(blocks):
                stride = strides[s] if (i == 0 and s > 0) else 1
                layers.append(DepthwiseSeparable(make_divisible(in_c * scale),
                                                 make_divisible(out_c * scale), stride, k, use_se,
                                                 lr_mults[s + 1]))
            setattr(self, stage_name, nn.Sequential(*layers))
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        last_c = make_divisible(_STAGES[-1][1][-1][2] * scale)
        if use_last_conv:
            self.last_conv = nn.Conv2D(last_c, class_expand, 1, bias_attr=False)
            self.hardswish = Hardswish()
            self.dropout = nn.Dropout(p=dropout_prob, mode="downscale_in_infer")
            self.num_features = class_expand
        else:
            self.last_conv = None
            self.num_features = last_c
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.num_features, self.class_num)
        # conv1 0, blocks2..blocks6 1..5, last_conv 6 (when present), fc last
        self.num_layer_ids = 8 if use_last_conv else 7

    def forward_features(self, x):
        x = self.conv1(x)
        for stage_name, _ in _STAGES:
            x = getattr(self, stage_name)(x)
        x = self.avg_pool(x)
        if self.last_conv is not None:
            x = self.dropout(self.hardswish(self.last_conv(x)))
        return self.flatten(x)

    def forward_head(self, x):
        return self.fc(x)

    def reset_classifier(self, class_num):
        self.class_num = check_class_num(class_num)
        self.fc = nn.Linear(self.num_features, self.class_num)

    def layer_id(self, param_name):
        if self.is_classifier_key(param_name):
            return self.num_layer_ids - 1
        head = param_name.split(".")[0]
        if head.startswith("blocks"):
            return int(head[len("blocks"):]) - 1  # blocks2 -> 1 ... blocks6 -> 5
        if head == "last_conv":
            return 6
        return 0


def _register(suffix, scale):
    name = f"PPLCNet_{suffix}"

    def factory(class_num: int = 1000, dropout_prob: float = 0.2, class_expand: int = 1280,
                lr_mult_list: Optional[list] = None, stride_list: Optional[list] = None,
                use_last_conv: bool = True) -> PPLCNet:
        return PPLCNet(scale=scale, class_num=class_num, dropout_prob=dropout_prob,
                       class_expand=class_expand, lr_mult_list=lr_mult_list,
                       stride_list=stride_list, use_last_conv=use_last_conv)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"``Arch: {{name: {name}, class_num: 1000, dropout_prob: 0.2, class_expand: 1280, "
        f"lr_mult_list: [1, 1, 1, 1, 1, 1], stride_list: [2, 2, 2, 2, 2], use_last_conv: true}}``"
        f"\n\nPP-LCNet at width scale {scale}.")
    MODELS.register(factory, name=name)
    return factory


# Explicit module symbols, so `grep PPLCNet_x1_0` finds the definition.
PPLCNet_x0_25 = _register("x0_25", 0.25)
PPLCNet_x0_35 = _register("x0_35", 0.35)
PPLCNet_x0_5 = _register("x0_5", 0.5)
PPLCNet_x0_75 = _register("x0_75", 0.75)
PPLCNet_x1_0 = _register("x1_0", 1.0)
PPLCNet_x1_5 = _register("x1_5", 1.5)
PPLCNet_x2_0 = _register("x2_0", 2.0)
PPLCNet_x2_5 = _register("x2_5", 2.5)
