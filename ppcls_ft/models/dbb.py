"""Diverse Branch Block (Ding et al., CVPR 2021), the training-time form PaddleClas's
``ResNet18_dbb.yaml`` selects with ``Arch.layer_type: DiverseBranchBlock``.

A k x k conv-BN is trained as the sum of four branches, each ending in batch norm:

* ``dbb_origin``: the k x k conv + BN itself;
* ``dbb_1x1``: a 1x1 conv + BN (only when the conv is not depthwise);
* ``dbb_avg``: 1x1 conv -> BN (padded) -> k x k average pool -> BN (``avgbn``);
* ``dbb_1x1_kxk``: an identity-initialised 1x1 conv -> BN (padded) -> k x k conv -> BN.

All four are linear, so after training they fold into one k x k conv (not implemented here:
the exported model keeps the branches, which is slower but gives the same outputs).
Sub-layer names follow PaddleClas, so its ``ResNet18_dbb`` state_dict keys match
(``blocks.0.conv0.dbb_1x1_kxk.bn1.bn._mean``, ...).

"Padded" BN (``_BNAndPad``): the branch pads *after* its BN, with the value BN gives a zero
input (``bias - weight * mean / sqrt(var + eps)``, running statistics), so the later k x k op
sees what it would see had the padding been applied to the conv input before BN; this is what
makes the branches foldable.
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .layers import BatchNorm2D, lr_attr


def _conv_bn(in_c, out_c, kernel, stride, padding, lr_mult):
    seq = nn.Sequential()
    seq.add_sublayer("conv", nn.Conv2D(in_c, out_c, kernel, stride=stride, padding=padding,
                                       weight_attr=lr_attr(lr_mult), bias_attr=False))
    seq.add_sublayer("bn", _bn(out_c, lr_mult))
    return seq


def _bn(channels, lr_mult):
    return BatchNorm2D(channels, weight_attr=lr_attr(lr_mult), bias_attr=lr_attr(lr_mult))


class _IdentityConv1x1(nn.Conv2D):
    """1x1 conv whose kernel is ``weight + I``; ``weight`` starts at zero, so the branch starts
    as the identity. ``I`` is a non-persistable buffer (not in the state_dict, as in PaddleClas)."""

    def __init__(self, channels, lr_mult):
        super().__init__(channels, channels, 1, bias_attr=False, weight_attr=lr_attr(lr_mult))
        eye = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
        self.register_buffer("id_tensor", paddle.to_tensor(eye), persistable=False)
        self.weight.set_value(paddle.zeros_like(self.weight))

    def forward(self, x):
        return F.conv2d(x, self.weight + self.id_tensor, None, stride=1, padding=0)


class _BNAndPad(nn.Layer):
    """BN, then pad ``pad`` pixels on every side with BN's output for a zero input."""

    def __init__(self, channels, pad, lr_mult):
        super().__init__()
        self.bn = _bn(channels, lr_mult)
        self.pad = pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn = self.bn
        value = bn.bias - bn.weight * bn._mean / paddle.sqrt(bn._variance + bn._epsilon)
        n, c, h, w = out.shape
        value = value.reshape([1, -1, 1, 1])
        rows = value.expand([n, c, self.pad, w])
        out = paddle.concat([rows, out, rows], axis=2)
        cols = value.expand([n, c, h + 2 * self.pad, self.pad])
        return paddle.concat([cols, out, cols], axis=3)


class DiverseBranchBlock(nn.Layer):
    """Drop-in for a k x k conv-BN(-ReLU) with ``groups=1`` (NCHW). ``act``: "relu" or None."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, act=None, lr_mult=1.0):
        super().__init__()
        pad = kernel_size // 2
        self.dbb_origin = _conv_bn(in_channels, out_channels, kernel_size, stride, pad, lr_mult)
        # PaddleClas adds the 1x1 branch and the conv in front of the pool whenever
        # groups < out_channels, which always holds for ResNet (groups = 1).
        self.dbb_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0, lr_mult)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_sublayer("conv", nn.Conv2D(in_channels, out_channels, 1, bias_attr=False,
                                                    weight_attr=lr_attr(lr_mult)))
        self.dbb_avg.add_sublayer("bn", _BNAndPad(out_channels, pad, lr_mult))
        self.dbb_avg.add_sublayer("avg", nn.AvgPool2D(kernel_size, stride=stride, padding=0))
        self.dbb_avg.add_sublayer("avgbn", _bn(out_channels, lr_mult))
        # internal width = in_channels (PaddleClas's choice for groups < out_channels), hence
        # the identity-initialised 1x1 conv
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_sublayer("idconv1", _IdentityConv1x1(in_channels, lr_mult))
        self.dbb_1x1_kxk.add_sublayer("bn1", _BNAndPad(in_channels, pad, lr_mult))
        self.dbb_1x1_kxk.add_sublayer("conv2", nn.Conv2D(in_channels, out_channels, kernel_size,
                                                         stride=stride, padding=0, bias_attr=False,
                                                         weight_attr=lr_attr(lr_mult)))
        self.dbb_1x1_kxk.add_sublayer("bn2", _bn(out_channels, lr_mult))
        self.act = nn.ReLU() if act else None

    def forward(self, x):
        out = self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        return self.act(out) if self.act is not None else out
