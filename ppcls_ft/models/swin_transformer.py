"""SwinTransformer (Liu et al. 2021, arXiv:2103.14030), key-compatible with PaddleClas.

Holds the whole family: window attention, blocks, patch merging, the backbone, the six PaddleClas
variants registered under their PaddleClas names, and the Swin-specific weight surgery
(``adapt_state_dict``) that lets a window-7 checkpoint load into a window-12 model or a model built
for another image size. Where PaddleClas is silently wrong we follow the original Swin instead:

- a stage whose feature map is no larger than the window clips the window to the map and uses no
  cyclic shift and no mask (original rule; official ImageNet weights were trained with it; the
  ``../shared/parity`` logits depend on it);
- any ``img_size`` divisible by 32 works: a map that is larger than the window but not a multiple
  of it is zero-padded (after ``norm1``) to the next multiple and cropped back after attention, and
  the shift mask is computed on the padded map (the convention of the Swin detection code and timm);
- ``use_fused_attn`` / ``use_fused_linear`` (set False in the real PaddleClas configs) are accepted
  for config compatibility, but fused kernels are a GPU-only (AMP O2) optimisation we do not
  implement: True raises ConfigError;
- the shift masks are non-persistent buffers, so they are not in the state_dict (PaddleClas <= 2.5
  files carried ``*.attn_mask``; ``adapt_state_dict`` drops them).

State_dict keys, shapes and dtypes equal PaddleClas's (``relative_position_index`` is an int64
buffer that is saved). Paddle ``Linear.weight`` is ``[in, out]``.
"""
import math
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle import ParamAttr
from paddle.nn.initializer import Constant, Normal

from ..errors import ConfigError
from ..registry import MODELS
from .base import ClassifierBase
from .layers import GELU, DropPath, LayerNorm, Linear, add_broadcast, check_class_num

# The reference inits Linear weights and bias tables with trunc_normal(std=0.02) cut at +-2
# (absolute, i.e. 100 sigma): that is a plain normal. Paddle's truncated kernel took 4.2 s of a
# 7 s SwinT-large build on CPU, so we draw N(0, 0.02) directly, once, at parameter creation.
_trunc_normal = Normal(mean=0.0, std=0.02)
_zeros = Constant(0.0)


def _linear(in_features, out_features, bias=True):
    """nn.Linear with the reference init (N(0, 0.02) weight, zero bias) applied at creation."""
    return Linear(in_features, out_features, weight_attr=ParamAttr(initializer=_trunc_normal),
                  bias_attr=ParamAttr(initializer=_zeros) if bias else False)

# Masked logits get -100 (reference value): exp(-100) underflows to 0 after softmax in float32.
_MASK_VALUE = -100.0

# (embed_dim, depths, num_heads) per size; PaddleClas/official Swin tables.
_ARCHS = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def relative_position_index(window):
    """int64 ``[W*W, W*W]``: row-major index into the ``(2W-1)**2`` bias table for token pairs."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)  # N, N, 2
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype("int64")


def shift_attn_mask(hp, wp, window, shift):
    """float32 ``[nW, W*W, W*W]`` additive mask for shifted windows on an ``hp x wp`` map.

    Tokens that come from different regions after the cyclic roll may not attend to each other.
    """
    region = np.zeros((hp, wp), np.float32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            region[hs, ws] = i * 3 + j
    win = region.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    differs = win[:, None, :] != win[:, :, None]
    return np.where(differs, _MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x, window):
    """``[B, H, W, C]`` -> ``[B*nW, W*W, C]`` (H, W multiples of ``window``)."""
    _, h, w, c = x.shape
    x = x.reshape([-1, h // window, window, w // window, window, c])
    return x.transpose([0, 1, 3, 2, 4, 5]).reshape([-1, window * window, c])


def window_reverse(windows, window, h, w):
    """Inverse of ``window_partition``: ``[B*nW, W*W, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.reshape([-1, h // window, w // window, window, window, c])
    return x.transpose([0, 1, 3, 2, 4, 5]).reshape([-1, h, w, c])


class Mlp(nn.Layer):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = _linear(dim, hidden)
        self.act = GELU()  # exact (erf) GELU, as in the reference
        self.fc2 = _linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Layer):
    """Multi-head self-attention inside square windows, with a learned relative-position bias."""

    def __init__(self, dim, window, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = self.create_parameter(
            shape=[(2 * window - 1) ** 2, num_heads], default_initializer=_trunc_normal)
        self.register_buffer("relative_position_index", paddle.to_tensor(relative_position_index(window)))
        self.qkv = _linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = _linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, mask=None):
        """x: ``[B*nW, N, C]``; mask: ``[nW, N, N]`` additive or None."""
        n, c = x.shape[1], x.shape[2]
        # split, not indexing one [3, B*nW, heads, N, d] tensor: each index's backward fills a
        # zero tensor the size of all three and the three are summed (12 % of a Swin-T training
        # step on the CPU); split's backward is one concat. Same values, same parameters.
        q, k, v = (t.reshape([-1, n, self.num_heads, c // self.num_heads]).transpose([0, 2, 1, 3])
                   for t in paddle.split(self.qkv(x), 3, axis=-1))
        q = q * self.scale
        attn = paddle.matmul(q, k, transpose_y=True)  # B*nW, heads, N, N
        bias = paddle.index_select(self.relative_position_bias_table,
                                   self.relative_position_index.reshape([-1]))
        bias = bias.reshape([n, n, -1]).transpose([2, 0, 1]).unsqueeze(0)  # 1, heads, N, N
        if mask is None:
            attn = add_broadcast(attn, bias)
        else:  # bias and mask first (small), then one add over the batch: a broadcast add is slow
            nw = mask.shape[0]
            bias = add_broadcast(mask.unsqueeze(1).expand([nw, self.num_heads, n, n]), bias)
            attn = add_broadcast(attn.reshape([-1, nw, self.num_heads, n, n]), bias)
            attn = attn.reshape([-1, self.num_heads, n, n])
        attn = self.attn_drop(F.softmax(attn, axis=-1))
        x = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([-1, n, c])
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Layer):
    """(Shifted-)window attention + MLP, pre-norm residual. ``resolution`` is the build-time map side."""

    def __init__(self, dim, resolution, num_heads, window, shift, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        if resolution <= window:  # original Swin rule: one window covers the map, nothing to shift
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self._masks = {}  # padded (H, W) -> mask for sizes other than the build size (dygraph)
        self._build_hw = (_ceil_to(resolution, window),) * 2
        mask = shift_attn_mask(*self._build_hw, window, shift) if shift else None
        # Non-persistent: recomputed from the geometry, never saved (PaddleClas <= 2.5 saved it).
        self.register_buffer("attn_mask", None if mask is None else paddle.to_tensor(mask), persistable=False)

    def _mask(self, hp, wp):
        if not self.shift:
            return None
        if (hp, wp) == self._build_hw:
            return self.attn_mask
        if (hp, wp) not in self._masks:
            self._masks[(hp, wp)] = paddle.to_tensor(shift_attn_mask(hp, wp, self.window, self.shift))
        return self._masks[(hp, wp)]

    def forward(self, x, h, w):
        """x: ``[B, H*W, C]`` -> same shape."""
        c, win, s = x.shape[2], self.window, self.shift
        y = self.norm1(x).reshape([-1, h, w, c])
        hp, wp = _ceil_to(h, win), _ceil_to(w, win)
        if (hp, wp) != (h, w):  # pad right/bottom with zeros to whole windows; cropped below
            y = F.pad(y, [0, wp - w, 0, hp - h], data_format="NHWC")
        if s:
            y = paddle.roll(y, shifts=(-s, -s), axis=(1, 2))
        y = self.attn(window_partition(y, win), mask=self._mask(hp, wp))
        y = window_reverse(y, win, hp, wp)
        if s:
            y = paddle.roll(y, shifts=(s, s), axis=(1, 2))
        if (hp, wp) != (h, w):
            y = y[:, :h, :w, :]
        x = x + self.drop_path(y.reshape([-1, h * w, c]))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Layer):
    """2x2 neighbourhood -> one token: concat 4C (order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
    x[1::2,1::2]), LayerNorm(4C), Linear 4C -> 2C without bias."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = _linear(4 * dim, 2 * dim, bias=False)
        self.norm = LayerNorm(4 * dim)

    def forward(self, x, h, w):
        c = x.shape[2]
        x = x.reshape([-1, h // 2, 2, w // 2, 2, c]).transpose([0, 1, 3, 4, 2, 5])
        return self.reduction(self.norm(x.reshape([-1, (h // 2) * (w // 2), 4 * c])))


class BasicLayer(nn.Layer):
    """One stage: ``depth`` blocks alternating plain / shifted windows, then optional PatchMerging."""

    def __init__(self, dim, resolution, depth, num_heads, window, drop_path, downsample, **block_args):
        super().__init__()
        self.blocks = nn.LayerList([
            SwinTransformerBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2,
                                 drop_path=drop_path[i], **block_args)
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, h, w):
        for blk in self.blocks:
            x = blk(x, h, w)
        if self.downsample is not None:
            x, h, w = self.downsample(x, h, w), h // 2, w // 2
        return x, h, w


class PatchEmbed(nn.Layer):
    """Non-overlapping ``patch x patch`` conv, then LayerNorm over channels (patch_norm)."""

    def __init__(self, patch_size, embed_dim, patch_norm=True):
        super().__init__()
        self.proj = nn.Conv2D(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose([0, 2, 1])
        return (self.norm(x) if self.norm is not None else x), h, w


def _ceil_to(n, m):
    return -(-n // m) * m


def _check_args(img_size, window_size, use_fused_attn, use_fused_linear):
    if img_size <= 0 or img_size % 32:
        raise ConfigError("Arch.img_size", f"must be a positive multiple of 32 (4x4 patches, then 3 "
                                           f"2x2 merges), got {img_size}; e.g. 224, 256, 384, 448")
    if window_size < 1:
        raise ConfigError("Arch.window_size", f"must be >= 1, got {window_size}")
    for key, value in (("use_fused_attn", use_fused_attn), ("use_fused_linear", use_fused_linear)):
        if value:
            raise ConfigError(f"Arch.{key}", "fused attention/linear kernels are a GPU-only (AMP O2) "
                                             "optimisation that ppcls_ft does not implement; set it to False")


class SwinTransformer(ClassifierBase):
    """Swin backbone + mean-pooled LayerNorm features + Linear ``head``. Build it through a
    registered variant (e.g. ``SwinTransformer_tiny_patch4_window7_224``)."""

    classifier_prefixes = ("head.",)

    def __init__(self, embed_dim: int, depths: tuple, num_heads: tuple, class_num: int = 1000,
                 img_size: int = 224, patch_size: int = 4, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_fused_attn: bool = False, use_fused_linear: bool = False):
        super().__init__()
        _check_args(img_size, window_size, use_fused_attn, use_fused_linear)
        self.class_num = check_class_num(class_num)
        self.img_size, self.window_size, self.depths = img_size, window_size, tuple(depths)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(patch_size, embed_dim, patch_norm)
        side = img_size // patch_size
        self.absolute_pos_embed = None
        if ape:
            self.absolute_pos_embed = self.create_parameter(
                shape=[1, side * side, embed_dim], default_initializer=_trunc_normal)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = np.linspace(0, drop_path_rate, sum(depths)).tolist()  # linear stochastic-depth decay
        self.layers = nn.LayerList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                embed_dim * 2 ** i, side // 2 ** i, depth, heads, window_size, dpr[start:start + depth],
                downsample=i < len(depths) - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate))
        self.norm = LayerNorm(self.num_features)
        self.head = _linear(self.num_features, class_num)  # LayerNorms keep Paddle's ones/zeros

    def forward_features(self, x):
        x, h, w = self.patch_embed(x)
        merges = 2 ** (len(self.layers) - 1)  # each PatchMerging halves the map
        if (h > 0 and h % merges) or (w > 0 and w % merges):  # -1 = unknown size while exporting
            raise ValueError(f"SwinTransformer input height and width must be multiples of "
                             f"{4 * merges}, got a {h}x{w} patch grid; resize or crop the images")
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x, h, w = layer(x, h, w)
        return self.norm(x).mean(axis=1)  # [N, C]: LayerNorm, then average over tokens

    def forward_head(self, x):
        return self.head(x)

    def reset_classifier(self, class_num):
        self.class_num = check_class_num(class_num)
        self.head = _linear(self.num_features, class_num)

    # Layer-wise LR decay: 0 = patch_embed / absolute_pos_embed, 1..sum(depths) = blocks in depth
    # order, last = final norm + head. A stage's PatchMerging shares the id of the block before it
    # (the last block of its stage), as in SimMIM's Swin fine-tuning recipe.
    @property
    def num_layer_ids(self):
        return sum(self.depths) + 2

    def layer_id(self, param_name):
        if param_name.startswith(("patch_embed.", "absolute_pos_embed")):
            return 0
        if param_name.startswith("layers."):
            parts = param_name.split(".")
            stage = int(parts[1])
            if parts[2] == "downsample":
                return sum(self.depths[:stage + 1])
            return sum(self.depths[:stage]) + int(parts[3]) + 1
        return self.num_layer_ids - 1

    def adapt_state_dict(self, state_dict):
        """Fit a PaddleClas Swin checkpoint to this model's geometry (see ``adapt_swin_state_dict``)."""
        return adapt_swin_state_dict(self, state_dict)


# ---------------------------------------------------------------------------------------------
# Weight surgery
# ---------------------------------------------------------------------------------------------

def _to_numpy(value):
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def _like(array, original):
    """Return ``array`` as the same kind (paddle Tensor or numpy) as ``original``."""
    return paddle.to_tensor(array) if isinstance(original, paddle.Tensor) else array


def _resize_grid(grid, size):
    """Bicubic resize of a float ``[h, w, ch]`` array to ``[size, size, ch]`` (align_corners=False,
    like the original Swin loader)."""
    t = paddle.to_tensor(grid.astype("float32").transpose(2, 0, 1)[None])
    out = F.interpolate(t, size=[size, size], mode="bicubic", align_corners=False)
    return out[0].numpy().transpose(1, 2, 0)


def resize_bias_table(table, window):
    """``[(2W'-1)**2, heads]`` -> ``[(2W-1)**2, heads]`` by bicubic interpolation of the grid."""
    old = int(round(math.sqrt(table.shape[0])))
    if old * old != table.shape[0]:
        raise ValueError(f"relative_position_bias_table of shape {list(table.shape)} is not square")
    grid = _resize_grid(table.reshape(old, old, -1), 2 * window - 1)
    return grid.reshape(-1, table.shape[1]).astype(table.dtype)


def adapt_swin_state_dict(model, state_dict):
    """Return a new dict that fits ``model``; the input is not modified.

    - ``*.attn_mask`` (PaddleClas <= 2.5 buffers) are dropped: masks are recomputed from geometry.
    - ``relative_position_bias_table`` whose shape differs (window-7 checkpoint into a window-12
      model, or a window clipped at another ``img_size``) is resized by bicubic interpolation of
      its ``(2W-1) x (2W-1) x heads`` grid.
    - ``relative_position_index`` is always the model's own: it is a pure function of the window,
      and a checkpoint's copy is wrong whenever the window differs.
    - ``absolute_pos_embed`` (``ape=True`` only; no official variant uses it) of another token
      count is bicubic-resized as a square ``side x side x C`` grid.
    Other shape mismatches (e.g. ``head.*`` with another class count) are left for the loader.
    """
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".attn_mask"):
            continue
        if key.endswith("relative_position_index") and key in own:
            out[key] = _like(own[key].numpy(), value)
            continue
        if key in own and key.endswith(("relative_position_bias_table", "absolute_pos_embed")):
            target = list(own[key].shape)
            array = _to_numpy(value)
            if list(array.shape) != target:
                array = _resize_table_or_embed(key, array, target)
                value = _like(array, value)
        out[key] = value
    for key, value in own.items():  # files saved without buffers: supply the index
        table_key = key.replace("relative_position_index", "relative_position_bias_table")
        if key.endswith("relative_position_index") and key not in out and table_key in out:
            out[key] = value.numpy()
    return out


def _resize_table_or_embed(key, array, target):
    if key.endswith("relative_position_bias_table"):
        if array.shape[1] != target[1]:
            raise ValueError(f"{key}: checkpoint has {array.shape[1]} heads, model has {target[1]}")
        return resize_bias_table(array, (int(round(math.sqrt(target[0]))) + 1) // 2)
    old, new = int(round(math.sqrt(array.shape[1]))), int(round(math.sqrt(target[1])))
    if array.shape[2] != target[2] or old * old != array.shape[1] or new * new != target[1]:
        raise ValueError(f"{key}: cannot resize {list(array.shape)} to {target}")
    grid = _resize_grid(array[0].reshape(old, old, -1), new)
    return grid.reshape(1, new * new, -1).astype(array.dtype)


# ---------------------------------------------------------------------------------------------
# Registered PaddleClas variants (defaults = PaddleClas factory defaults)
# ---------------------------------------------------------------------------------------------

def _variant(size, args):
    embed_dim, depths, num_heads = _ARCHS[size]
    return SwinTransformer(embed_dim=embed_dim, depths=depths, num_heads=num_heads, **args)


@MODELS.register
def SwinTransformer_tiny_patch4_window7_224(
        class_num: int = 1000, img_size: int = 224, window_size: int = 7, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2, ape: bool = False,
        use_fused_attn: bool = False, use_fused_linear: bool = False):
    """``Arch: {name: SwinTransformer_tiny_patch4_window7_224, class_num: 1000, img_size: 224,
    drop_path_rate: 0.2, use_fused_attn: False, use_fused_linear: False}`` (28M params)."""
    return _variant("tiny", dict(locals()))


@MODELS.register
def SwinTransformer_small_patch4_window7_224(
        class_num: int = 1000, img_size: int = 224, window_size: int = 7, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3, ape: bool = False,
        use_fused_attn: bool = False, use_fused_linear: bool = False):
    """``Arch: {name: SwinTransformer_small_patch4_window7_224, class_num: 1000, drop_path_rate: 0.3}``."""
    return _variant("small", dict(locals()))


@MODELS.register
def SwinTransformer_base_patch4_window7_224(
        class_num: int = 1000, img_size: int = 224, window_size: int = 7, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.5, ape: bool = False,
        use_fused_attn: bool = False, use_fused_linear: bool = False):
    """``Arch: {name: SwinTransformer_base_patch4_window7_224, class_num: 1000, drop_path_rate: 0.5}``."""
    return _variant("base", dict(locals()))


@MODELS.register
def SwinTransformer_large_patch4_window7_224(
        class_num: int = 1000, img_size: int = 224, window_size: int = 7, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False,
        use_fused_attn: bool = False, use_fused_linear: bool = False):
    """``Arch: {name: SwinTransformer_large_patch4_window7_224, class_num: 1000, drop_path_rate: 0.1}``
    (PaddleClas's official weights for large are the ImageNet-22k -> 1k fine-tuned ones)."""
    return _variant("large", dict(locals()))


@MODELS.register
def SwinTransformer_base_patch4_window12_384(
        class_num: int = 1000, img_size: int = 384, window_size: int = 12, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.5, ape: bool = False,
        use_fused_attn: bool = False, use_fused_linear: bool = False):
    """``Arch: {name: SwinTransformer_base_patch4_window12_384, class_num: 1000, img_size: 384}``."""
    return _variant("base", dict(locals()))


@MODELS.register
def SwinTransformer_large_patch4_window12_384(
        class_num: int = 1000, img_size: int = 384, window_size: int = 12, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False,
        use_fused_attn: bool = False, use_fused_linear: bool = False):
    """``Arch: {name: SwinTransformer_large_patch4_window12_384, class_num: 1000, img_size: 384}``."""
    return _variant("large", dict(locals()))
