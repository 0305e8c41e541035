"""ResNet and ResNet-vd (18/34/50/101/152) with PaddleClas ``legendary_models`` state_dict keys.

Keys: ``stem.{i}.{conv,bn}.*``, ``blocks.{j}.{conv0,conv1,conv2,short}.{conv,bn}.*``, ``fc.*``
(``../shared/parity/ResNet50.keys.json``). ``_vd`` ("bag of tricks" variant D) replaces the 7x7
stem with three 3x3 convs and downsamples shortcuts with a 2x2 average pool before a stride-1
1x1 conv instead of a strided 1x1 conv that skips 3/4 of the pixels.

Where PaddleClas is fragile we differ on purpose: a vd shortcut pools by the stage's own stride
(PaddleClas always pools by 2, which crashes when ``stride_list`` sets a stage stride of 1), and
``max_pool: false`` removes the stem max-pool instead of being ignored.

``layer_type: DiverseBranchBlock`` trains the convs inside the residual blocks as Diverse Branch
Blocks (``dbb.py``; PaddleClas's ResNet18_dbb), and ``use_first_short_conv: false`` gives the
first block an identity shortcut instead of a 1x1 projection (the original ResNet's layout).
"""
import math
from typing import Optional

import paddle
import paddle.nn as nn
from paddle import ParamAttr
from paddle.nn.initializer import Uniform

from ..errors import ConfigError
from ..registry import MODELS
from .base import ClassifierBase
from .dbb import DiverseBranchBlock
from .layers import ConvBNAct, check_class_num, check_lr_mult_list, check_stride_list

# depth -> (block kind, blocks per stage); stage widths are the bottleneck widths 64..512.
_DEPTHS = (
    (18, "basic", (2, 2, 2, 2)),
    (34, "basic", (3, 4, 6, 3)),
    (50, "bottleneck", (3, 4, 6, 3)),
    (101, "bottleneck", (3, 4, 23, 3)),
    (152, "bottleneck", (3, 8, 36, 3)),
)
_WIDTHS = (64, 128, 256, 512)


class _ResConvBN(ConvBNAct):
    """ConvBNAct with the optional vd average-pool in front (no parameters, so keys are unchanged)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, act=None, lr_mult=1.0,
                 pool_stride=1, data_format="NCHW"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, act=act,
                         lr_mult=lr_mult, data_format=data_format)
        # ceil_mode keeps the pooled size equal to a strided conv's ceil(n / s) on odd sizes.
        self.avg_pool = (nn.AvgPool2D(pool_stride, pool_stride, ceil_mode=True, data_format=data_format)
                         if pool_stride > 1 else None)

    def forward(self, x):
        if self.avg_pool is not None:
            x = self.avg_pool(x)
        return super().forward(x)


_LAYER_TYPES = ("ConvBNLayer", "DiverseBranchBlock")


def _block_conv(layer_type):
    """The conv-BN(-act) factory of the block convs: plain, or a Diverse Branch Block."""
    if layer_type == "DiverseBranchBlock":
        def make(in_c, out_c, kernel, stride, act, lr_mult, data_format):
            return DiverseBranchBlock(in_c, out_c, kernel, stride, act, lr_mult)
        return make

    def make(in_c, out_c, kernel, stride, act, lr_mult, data_format):
        return _ResConvBN(in_c, out_c, kernel, stride, act, lr_mult, data_format=data_format)
    return make


def _shortcut(in_c, out_c, stride, vd_pool, lr_mult, data_format):
    """1x1 projection: strided conv (ResNet / first vd block) or avg-pool then conv (vd)."""
    if vd_pool:
        return _ResConvBN(in_c, out_c, 1, 1, None, lr_mult, stride, data_format)
    return _ResConvBN(in_c, out_c, 1, stride, None, lr_mult, 1, data_format)


class BasicBlock(nn.Layer):
    """Two 3x3 convs (ResNet18/34); ``conv0`` carries the stride."""

    expansion = 1

    def __init__(self, in_c, width, stride, project, vd_pool, lr_mult, data_format,
                 conv=_block_conv("ConvBNLayer")):
        super().__init__()
        self.conv0 = conv(in_c, width, 3, stride, "relu", lr_mult, data_format)
        self.conv1 = conv(width, width, 3, 1, None, lr_mult, data_format)
        self.short = _shortcut(in_c, width, stride, vd_pool, lr_mult, data_format) if project else None
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.short is None else self.short(x)
        return self.relu(self.conv1(self.conv0(x)) + identity)


class BottleneckBlock(nn.Layer):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet50/101/152)."""

    expansion = 4

    def __init__(self, in_c, width, stride, project, vd_pool, lr_mult, data_format,
                 conv=_block_conv("ConvBNLayer")):
        super().__init__()
        out_c = width * 4
        self.conv0 = conv(in_c, width, 1, 1, "relu", lr_mult, data_format)
        self.conv1 = conv(width, width, 3, stride, "relu", lr_mult, data_format)
        self.conv2 = conv(width, out_c, 1, 1, None, lr_mult, data_format)
        self.short = _shortcut(in_c, out_c, stride, vd_pool, lr_mult, data_format) if project else None
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.short is None else self.short(x)
        return self.relu(self.conv2(self.conv1(self.conv0(x))) + identity)


class ResNet(ClassifierBase):
    """ResNet / ResNet-vd backbone + ``fc``. Built through the registered names ``ResNet50``,
    ``ResNet50_vd``, ...; ``lr_mult_list`` = [stem, stage1, stage2, stage3, stage4]."""

    classifier_prefixes = ("fc.",)

    def __init__(self, depth: int = 50, vd: bool = False, class_num: int = 1000,
                 lr_mult_list: Optional[list] = None, stride_list: Optional[list] = None,
                 max_pool: bool = True, data_format: str = "NCHW", input_image_channel: int = 3,
                 layer_type: str = "ConvBNLayer", use_first_short_conv: bool = True):
        super().__init__()
        table = {d: (kind, n) for d, kind, n in _DEPTHS}
        if depth not in table:
            raise ConfigError("Arch.name", f"ResNet depth must be one of {sorted(table)}, got {depth}")
        if data_format not in ("NCHW", "NHWC"):
            raise ConfigError("Arch.data_format", f"must be 'NCHW' or 'NHWC', got {data_format!r}")
        if layer_type not in _LAYER_TYPES:
            raise ConfigError("Arch.layer_type", f"must be one of {', '.join(_LAYER_TYPES)}, got "
                                                 f"{layer_type!r}")
        if layer_type == "DiverseBranchBlock" and data_format != "NCHW":
            raise ConfigError("Arch.data_format", "DiverseBranchBlock pads along NCHW axes; use NCHW")
        kind, self.depths = table[depth]
        if not use_first_short_conv and kind == "bottleneck":
            raise ConfigError("Arch.use_first_short_conv", "False needs equal widths at the first "
                                                           "block (ResNet18/34); bottleneck blocks "
                                                           "widen 64 -> 256 and need the projection")
        self.class_num = check_class_num(class_num)
        # what for_export rebuilds the model from
        self._args = dict(depth=depth, vd=vd, lr_mult_list=lr_mult_list, stride_list=stride_list,
                          max_pool=max_pool, input_image_channel=input_image_channel,
                          layer_type=layer_type, use_first_short_conv=use_first_short_conv)
        lr_mults = check_lr_mult_list(lr_mult_list, 5)
        strides = check_stride_list(stride_list, 5)
        self.data_format = data_format

        stem_cfg = (((input_image_channel, 32, 3, strides[0]), (32, 32, 3, 1), (32, 64, 3, 1))
                    if vd else ((input_image_channel, 64, 7, strides[0]),))
        self.stem = nn.Sequential(*[
            _ResConvBN(i, o, k, s, "relu", lr_mults[0], data_format=data_format)
            for i, o, k, s in stem_cfg])
        self.max_pool = (nn.MaxPool2D(3, strides[1], padding=1, data_format=data_format)
                         if max_pool else None)

        block_cls = BasicBlock if kind == "basic" else BottleneckBlock
        conv = _block_conv(layer_type)
        blocks, in_c = [], 64
        for stage, (n, width) in enumerate(zip(self.depths, _WIDTHS)):
            for i in range(n):
                first = i == 0
                stride = strides[stage + 1] if first and stage > 0 else 1
                # The very first projection of a vd net has stride 1 and keeps the plain conv.
                vd_pool = vd and not (stage == 0 and first)
                project = first and (use_first_short_conv or stage > 0)
                blocks.append(block_cls(in_c, width, stride, project, vd_pool, lr_mults[stage + 1],
                                        data_format, conv))
                in_c = width * block_cls.expansion
        self.blocks = nn.Sequential(*blocks)
        self.avg_pool = nn.AdaptiveAvgPool2D(1, data_format=data_format)
        self.flatten = nn.Flatten()
        self.num_features = in_c
        self.fc = self._make_fc(self.class_num)
        # stage index of each entry of ``blocks``, for layer_id
        self._block_stage = tuple(s for s, n in enumerate(self.depths) for _ in range(n))

    def _make_fc(self, class_num):
        stdv = 1.0 / math.sqrt(self.num_features)  # PaddleClas init: U(-1/sqrt(C), 1/sqrt(C))
        return nn.Linear(self.num_features, class_num,
                         weight_attr=ParamAttr(initializer=Uniform(-stdv, stdv)))

    def forward_features(self, x):
        if self.data_format == "NHWC":
            x = paddle.transpose(x, [0, 2, 3, 1])  # inputs stay NCHW, like PaddleClas
        x = self.stem(x)
        if self.max_pool is not None:
            x = self.max_pool(x)
        x = self.blocks(x)
        return self.flatten(self.avg_pool(x))

    def forward_head(self, x):
        return self.fc(x)

    def for_export(self):
        """An NHWC ResNet exports as its NCHW twin with the same weights (a convolution's weight
        is OIHW in both layouts, so every key and shape is the same). Why: paddle-inference
        3.3.1's oneDNN passes mis-read the NHWC graph (the stem convolution after the input's
        transpose fails its channel check, tests/test_onednn_conv.py), while an NCHW graph is
        what PaddleClas's deploy code and every engine here run."""
        if self.data_format == "NCHW":
            return self
        rng = paddle.get_rng_state()  # building draws initial weights: leave training's stream
        try:
            twin = ResNet(**self._args, class_num=self.class_num, data_format="NCHW")
        finally:
            paddle.set_rng_state(rng)
        twin.set_state_dict(self.state_dict())
        return twin

    def reset_classifier(self, class_num):
        self.class_num = check_class_num(class_num)
        self.fc = self._make_fc(self.class_num)

    # stem 0, stages 1..4, fc 5
    num_layer_ids = 6

    def layer_id(self, param_name):
        if self.is_classifier_key(param_name):
            return self.num_layer_ids - 1
        if param_name.startswith("blocks."):
            return self._block_stage[int(param_name.split(".")[1])] + 1
        return 0


def _register(depth, vd):
    name = f"ResNet{depth}{'_vd' if vd else ''}"

    def factory(class_num: int = 1000, lr_mult_list: Optional[list] = None,
                stride_list: Optional[list] = None, max_pool: bool = True,
                data_format: str = "NCHW", input_image_channel: int = 3,
                layer_type: str = "ConvBNLayer", use_first_short_conv: bool = True) -> ResNet:
        return ResNet(depth=depth, vd=vd, class_num=class_num, lr_mult_list=lr_mult_list,
                      stride_list=stride_list, max_pool=max_pool, data_format=data_format,
                      input_image_channel=input_image_channel, layer_type=layer_type,
                      use_first_short_conv=use_first_short_conv)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"``Arch: {{name: {name}, class_num: 1000, lr_mult_list: [1, 1, 1, 1, 1], "
        f"stride_list: [2, 2, 2, 2, 2], max_pool: true, data_format: NCHW, "
        f"input_image_channel: 3, layer_type: ConvBNLayer, use_first_short_conv: true}}``\n\n"
        f"lr_mult_list: [stem, stage1..stage4] multipliers (0 freezes); stride_list: "
        f"[stem conv, max-pool, stage2, stage3, stage4]; layer_type: DiverseBranchBlock trains "
        f"the block convs as Diverse Branch Blocks.")
    MODELS.register(factory, name=name)
    return factory


# Explicit module symbols, so `grep ResNet50_vd` finds the definition.
ResNet18 = _register(18, False)
ResNet34 = _register(34, False)
ResNet50 = _register(50, False)
ResNet101 = _register(101, False)
ResNet152 = _register(152, False)
ResNet18_vd = _register(18, True)
ResNet34_vd = _register(34, True)
ResNet50_vd = _register(50, True)
ResNet101_vd = _register(101, True)
ResNet152_vd = _register(152, True)
