"""Per-image transforms with PaddleClas names and formulas, plus ``build_transforms``.

One implementation serves training, evaluation, ``tools/infer.py`` and ``deploy/``: PaddleClas
re-implements preprocessing in ``deploy/`` and users then see "predictions differ after export"
(COMPAT §8). Every op is a callable ``op(img) -> img`` on numpy HWC arrays (uint8 until
``NormalizeImage``, float32 after), registered in ``TRANSFORMS`` under its PaddleClas spelling.

Randomness: random ops draw from python's ``random`` module and numpy's global RNG, exactly like
PaddleClas. The loader (``data/loader.py``) reseeds both per sample from (seed, epoch, position),
so augmentation is reproducible and independent of the number of worker processes.
"""
import math
import random
from typing import Optional, Union

import cv2
import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..registry import TRANSFORMS

# PaddleClas interpolation names. cv2 has no "box"/"hamming"; PIL has no "area", for which we
# use BOX (an area average) instead of PaddleClas's KeyError.
_CV2_INTERP = {
    "nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
    "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4,
}
_PIL_INTERP = {
    "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "area": Image.BOX, "box": Image.BOX,
    "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "hamming": Image.HAMMING,
}


# PaddleClas's ``interpolation: random`` draws one of these two per call, on either backend.
_RANDOM_CV2 = (cv2.INTER_LINEAR, cv2.INTER_CUBIC)
_RANDOM_PIL = (Image.BILINEAR, Image.BICUBIC)


class Resizer:
    """``resize(img, (w, h))`` with a PaddleClas interpolation name and backend (cv2 | pil).

    Defaults follow PaddleClas: without interpolation both backends resize bilinearly.
    ``"random"`` picks bilinear or bicubic per call with python ``random`` (PaddleClas's pair).
    """

    def __init__(self, interpolation: Optional[str] = None, backend: str = "cv2"):
        backend = str(backend).lower()
        if backend not in ("cv2", "pil"):
            raise ValueError(f"backend must be 'cv2' or 'pil', got {backend!r}")
        table = _CV2_INTERP if backend == "cv2" else _PIL_INTERP
        name = None if interpolation is None else str(interpolation).lower()
        if name is not None and name != "random" and name not in table:
            raise ValueError(f"interpolation {interpolation!r} is not available with backend "
                             f"{backend!r}; choose one of {', '.join(sorted(table))}, random")
        self.backend = backend
        self.name = name
        self._table = table

    def _method(self):
        if self.name is None:
            return cv2.INTER_LINEAR if self.backend == "cv2" else Image.BILINEAR
        if self.name == "random":
            return random.choice(_RANDOM_CV2 if self.backend == "cv2" else _RANDOM_PIL)
        return self._table[self.name]

    def __call__(self, img, size):
        size = (int(size[0]), int(size[1]))
        if self.backend == "cv2":
            return cv2.resize(img, size, interpolation=self._method())
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, self._method()))


def _pair(size, what):
    """int -> (s, s); [w, h] -> (w, h)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what} must be an int or [width, height], got {size!r}")
    if min(size) <= 0:
        raise ValueError(f"{what} must be positive, got {list(size)}")
    return size


# 178,956,970 pixels: the size at which Pillow itself refuses an image (2 x Image.MAX_IMAGE_PIXELS,
# "could be decompression bomb DOS attack"); 512 MiB as RGB. Every camera up to 108 MP passes
# (12032 x 9024 = 108.6 M); a 30000 x 30000 bomb (900 M, 2.7 GB decoded) does not. cv2.imdecode
# alone would decode anything below 2**30 pixels.
DEFAULT_MAX_PIXELS = 178_956_970


def header_pixels(data):
    """``(pixels, "W x H")`` from the header of encoded bytes, without decoding the pixels;
    ``(None, None)`` when Pillow does not know the format (cv2 may still decode it)."""
    import io
    import re
    import warnings

    from PIL import UnidentifiedImageError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0] * im.size[1], f"{im.size[0]} x {im.size[1]}"
        except Image.DecompressionBombError as exc:  # Pillow checks its own limit before it tells
            found = re.search(r"\((\d+) pixels\)", str(exc))  # "Image size (N pixels) exceeds"
            return (int(found.group(1)) if found else float("inf")), None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None, None


@TRANSFORMS.register
class DecodeImage:
    """Encoded bytes -> HWC uint8 (cv2 decodes BGR; ``to_rgb`` flips to RGB).

    YAML: ``- DecodeImage: {to_rgb: True, channel_first: False, backend: cv2,
    max_pixels: 178956970}``. A numpy array passes through unchanged (it is taken to be decoded
    RGB already), so ``Compose`` also accepts arrays. ``backend: pil`` decodes with Pillow
    (``convert("RGB")``, as PaddleClas does): the pixels can differ from cv2's by the JPEG
    decoder's rounding. ``to_np`` is accepted for PaddleClas configs; only ``True`` exists here
    (every op works on numpy arrays).

    ``max_pixels`` (ppcls_ft; PaddleClas has no limit) refuses an image whose header declares more
    pixels (width x height), before decoding it: a "decompression bomb" such as a 30000 x 30000
    PNG of one colour is a few hundred KB on disk and 2.7 GB decoded. A refused training or
    evaluation image is skipped with a warning naming it, like a corrupt one; ``infer`` and
    ``deploy`` stop with that message. ``null`` removes the limit.
    """

    def __init__(self, to_rgb: bool = True, channel_first: bool = False, backend: str = "cv2",
                 to_np: bool = True, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        if str(backend).lower() not in ("cv2", "pil"):
            raise ValueError(f"backend must be 'cv2' or 'pil', got {backend!r}")
        if to_np is not True:
            raise ValueError("to_np: False (PaddleClas hands a PIL image to the next op) is not "
                             "supported: ppcls_ft ops work on numpy arrays; remove the key")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be a positive pixel count or null (no limit), got "
                             f"{max_pixels}")
        self.to_rgb = to_rgb
        self.channel_first = channel_first
        self.backend = str(backend).lower()
        self.max_pixels = max_pixels

    def _decode_pil(self, img):
        import io
        try:
            with Image.open(io.BytesIO(img)) as pil:
                rgb = np.asarray(pil.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode {len(img)} bytes as an image with PIL ({e}); "
                            "re-export it or remove it from the list") from None
        return rgb[:, :, ::-1]  # BGR, like cv2, so to_rgb means the same on both backends

    def __call__(self, img):
        if isinstance(img, np.ndarray):
            return img
        if not isinstance(img, (bytes, bytearray, memoryview)) or len(img) == 0:
            got = "empty bytes" if isinstance(img, bytes) else type(img).__name__
            raise DataError(f"DecodeImage expects non-empty encoded image bytes, got {got}")
        self._check_size(img)
        if self.backend == "pil":
            out = self._decode_pil(img)
        else:
            out = cv2.imdecode(np.frombuffer(img, dtype=np.uint8), cv2.IMREAD_COLOR)
        if out is None:
            raise DataError(f"cannot decode {len(img)} bytes as an image (corrupt or not a "
                            "JPEG/PNG/BMP/WebP file); re-export it or remove it from the list")
        if self.to_rgb:
            out = out[:, :, ::-1]
        if self.channel_first:
            out = out.transpose((2, 0, 1))
        return np.ascontiguousarray(out)

    def _check_size(self, data):
        if self.max_pixels is None:
            return
        pixels, dims = header_pixels(bytes(data))
        if pixels is not None and pixels > self.max_pixels:
            size = f"{dims} = {pixels:,} pixels" if dims else f"{pixels:,} pixels"
            raise DataError(f"image of {size} is above DecodeImage.max_pixels {self.max_pixels:,} "
                            "(a decompression bomb, or a scan to downscale first); not decoded. "
                            "Resize it, or raise max_pixels in the DecodeImage entry of transform_ops")


@TRANSFORMS.register
class ResizeImage:
    """Resize to ``size`` (int or [w, h]) or the short side to ``resize_short``.

    YAML: ``- ResizeImage: {resize_short: 256, interpolation: bilinear, backend: cv2}``
    (PaddleClas's ``return_numpy`` is accepted as True).
    Short side (PaddleClas formula): ``w = int(round(w * S / min(w, h)))``, same for h.
    """

    def __init__(self, size: Optional[Union[int, list]] = None, resize_short: Optional[int] = None,
                 interpolation: Optional[str] = None, backend: str = "cv2", return_numpy: bool = True):
        if return_numpy is not True:
            raise ValueError("return_numpy: False (PaddleClas hands a PIL image to the next op) is "
                             "not supported: ppcls_ft ops work on numpy arrays; remove the key")
        if resize_short is not None and resize_short > 0:
            self.resize_short, self.size = int(resize_short), None
        elif size is not None:
            self.resize_short, self.size = None, _pair(size, "size")
        else:
            raise ValueError("set either resize_short (short side in pixels) or size (int or [w, h])")
        self.resize = Resizer(interpolation, backend)

    def __call__(self, img):
        if self.resize_short is not None:
            h, w = img.shape[:2]
            percent = float(self.resize_short) / min(w, h)
            size = (int(round(w * percent)), int(round(h * percent)))
        else:
            size = self.size
        return self.resize(img, size)


@TRANSFORMS.register
class CropImage:
    """Centre crop of ``size`` (int or [w, h]) at ``((W - w) // 2, (H - h) // 2)``.

    YAML: ``- CropImage: {size: 224}``. PaddleClas silently returns a smaller image when the
    input is smaller than the crop (batches then fail to stack); we raise instead.
    """

    def __init__(self, size: Union[int, list]):
        self.size = _pair(size, "size")

    def __call__(self, img):
        w, h = self.size
        img_h, img_w = img.shape[:2]
        if img_w < w or img_h < h:
            raise DataError(f"CropImage size {w}x{h} is larger than the image {img_w}x{img_h}; "
                            "resize first (ResizeImage resize_short >= crop size)")
        x0, y0 = (img_w - w) // 2, (img_h - h) // 2
        return img[y0:y0 + h, x0:x0 + w]


@TRANSFORMS.register
class RandCropImage:
    """Random-resized crop (PaddleClas variant), then resize to ``size`` (int or [w, h]).

    YAML: ``- RandCropImage: {size: 224, scale: [0.08, 1.0], ratio: [0.75, 1.333],
    interpolation: bicubic, backend: pil, use_log_aspect: False}``. One draw, no retry loop: the
    aspect ratio is ``U(ratio)`` (``use_log_aspect``: ``exp(U(log ratio))``, as PaddleClas); the
    area fraction is drawn from ``scale`` clipped to the largest fraction that fits the image at
    that ratio (PaddleClas's fallback), so the crop always lies inside. ``progress_size`` is
    accepted and has no effect: PaddleClas stores it for progressive resizing, which its
    ``RandCropImage`` never reads either.
    """

    def __init__(self, size: Union[int, list], scale: Optional[list] = None,
                 ratio: Optional[list] = None, interpolation: Optional[str] = None,
                 backend: str = "cv2", use_log_aspect: bool = False,
                 progress_size: Optional[list] = None):
        if progress_size is not None:
            from ..config import warn_no_effect
            warn_no_effect("RandCropImage.progress_size", "progressive resizing is not implemented "
                                                          "(PaddleClas's RandCropImage ignores it too); "
                                                          "crops are resized to size")
        self.use_log_aspect = bool(use_log_aspect)
        self.size = _pair(size, "size")
        self.scale = [0.08, 1.0] if scale is None else [float(s) for s in scale]
        self.ratio = [3.0 / 4.0, 4.0 / 3.0] if ratio is None else [float(r) for r in ratio]
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [min, max] with 0 < min <= max, got {scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be [min, max] with 0 < min <= max, got {ratio}")
        self.resize = Resizer(interpolation, backend)

    def crop_box(self, img_w, img_h):
        """Draw ``(x, y, w, h)`` of the crop with python ``random`` (PaddleClas order of draws)."""
        if self.use_log_aspect:
            ratio = math.exp(random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        else:
            ratio = random.uniform(*self.ratio)
        aspect = np.sqrt(ratio)
        unit_w, unit_h = aspect, 1.0 / aspect
        bound = min((img_w / img_h) / unit_w ** 2, (img_h / img_w) / unit_h ** 2)
        lo, hi = min(self.scale[0], bound), min(self.scale[1], bound)
        side = np.sqrt(img_w * img_h * random.uniform(lo, hi))
        w = min(max(int(side * unit_w), 1), img_w)
        h = min(max(int(side * unit_h), 1), img_h)
        x = random.randint(0, img_w - w)
        y = random.randint(0, img_h - h)
        return x, y, w, h

    def __call__(self, img):
        x, y, w, h = self.crop_box(img.shape[1], img.shape[0])
        return self.resize(img[y:y + h, x:x + w], self.size)


@TRANSFORMS.register
class RandFlipImage:
    """Flip with probability 0.5. YAML: ``- RandFlipImage: {flip_code: 1}``.

    ``flip_code``: 1 horizontal, 0 vertical, -1 both (cv2.flip codes).
    """

    def __init__(self, flip_code: int = 1):
        if flip_code not in (-1, 0, 1):
            raise ValueError(f"flip_code must be 1 (horizontal), 0 (vertical) or -1 (both), "
                             f"got {flip_code}")
        self.flip_code = flip_code

    def __call__(self, img):
        if random.randint(0, 1) == 1:
            return cv2.flip(img, self.flip_code)
        return img


def _number(value, what):
    """A float, or a string such as ``"1.0/255.0"`` (COMPAT §1), parsed without ``eval``."""
    if isinstance(value, str):
        parts = value.split("/")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{what} must be a number or 'a/b', got {value!r}") from None
        if len(nums) > 2 or (len(nums) == 2 and nums[1] == 0):
            raise ValueError(f"{what} must be a number or 'a/b', got {value!r}")
        return nums[0] / nums[1] if len(nums) == 2 else nums[0]
    return float(value)


@TRANSFORMS.register
class NormalizeImage:
    """``(x * scale - mean) / std`` in float32 (float16 with ``output_fp16``).

    YAML: ``- NormalizeImage: {scale: 1.0/255.0, mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225], order: ''}``. ``order: chw`` expects a CHW input (after
    ``ToCHWImage``); '' or hwc expects HWC, which is what every PaddleClas config writes. A
    layout that does not match ``order`` is an error naming it (PaddleClas broadcasts the mean
    along the wrong axis or fails inside numpy). Without ``order`` the image's own layout is
    used (channels last, else first): PaddleClas's default ``chw`` fails on the HWC images its
    pipelines produce, and files exported by ppcls_ft 0.1 omit the key.
    ``channel_num: 4`` appends a zero channel.
    """

    def __init__(self, scale: Optional[Union[float, str]] = None, mean: Optional[list] = None,
                 std: Optional[list] = None, order: Optional[str] = None,
                 output_fp16: bool = False, channel_num: int = 3):
        if channel_num not in (3, 4):
            raise ValueError(f"channel_num must be 3 or 4, got {channel_num}")
        if order is not None and str(order).lower() not in ("", "hwc", "chw"):
            raise ValueError(f"order must be '', 'hwc' or 'chw', got {order!r}")
        self.order = None if order is None else str(order).lower()
        self.chw = self.order == "chw"
        self.scale = np.float32(1.0 / 255.0 if scale is None else _number(scale, "scale"))
        mean = [0.485, 0.456, 0.406] if mean is None else mean
        std = [0.229, 0.224, 0.225] if std is None else std
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)  # HWC; transposed for CHW
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
        if np.any(self.std == 0):
            raise ValueError(f"std must not contain 0, got {std}")
        self.channel_num = channel_num
        self.dtype = np.float16 if output_fp16 else np.float32

    def __call__(self, img):
        img = np.asarray(img)
        chw = self.chw
        if self.order is None and img.ndim == 3:  # no order given: the image's own layout
            chw = img.shape[-1] != self.mean.size and img.shape[0] == self.mean.size
        axis = 0 if chw else -1
        if img.ndim != 3 or (self.mean.size != 1 and img.shape[axis] != self.mean.size):
            layout = "CHW" if chw else "HWC"
            raise DataError(f"NormalizeImage order {'chw' if chw else repr('')} expects a "
                            f"{layout} image with {self.mean.size} channels, got shape {img.shape}; "
                            "set order: '' for an HWC image (after DecodeImage) or put ToCHWImage "
                            "before it for order: chw")
        mean, std = (self.mean.reshape(-1, 1, 1), self.std.reshape(-1, 1, 1)) if chw else (self.mean, self.std)
        img = (img.astype(np.float32) * self.scale - mean) / std
        if self.channel_num == 4:
            axis = 0 if chw else 2
            pad_shape = list(img.shape)
            pad_shape[axis] = 1
            img = np.concatenate([img, np.zeros(pad_shape, np.float32)], axis=axis)
        return img.astype(self.dtype)


@TRANSFORMS.register
class ToCHWImage:
    """HWC -> CHW. YAML: ``- ToCHWImage:``. Optional: the dataset transposes HWC itself."""

    def __call__(self, img):
        return np.asarray(img).transpose((2, 0, 1))


class Compose:
    """The ops of one ``transform_ops`` list applied in order; ``.ops`` lists them.

    ``chw`` is True when the output is channel-first (a ``ToCHWImage`` or a channel-first
    ``DecodeImage`` is present), so the dataset knows whether it still has to transpose.

    Some ops also make a label from what they did (PaddleClas's ``BlurImage`` -> ``blur_image``,
    ``RandomRot90`` -> ``random_rot90_orientation``): such an op names it in ``label_key`` and
    has ``labelled(img) -> (img, label)``. ``apply`` collects those labels for
    ``CustomLabelDataset``; everywhere else they are dropped, as PaddleClas drops them.
    """

    def __init__(self, ops):
        self.ops = list(ops)

    @property
    def chw(self):
        return any(isinstance(op, ToCHWImage)
                   or (isinstance(op, DecodeImage) and op.channel_first) for op in self.ops)

    def __call__(self, img):
        for op in self.ops:
            img = op(img)
        return img

    def label_keys(self):
        """The labels this pipeline produces (``label_key`` of its ops)."""
        return [op.label_key for op in self.ops if getattr(op, "label_key", None)]

    def apply(self, img):
        """``(image, {label_key: label})``: the ops in order, with the labels some of them make."""
        labels = {}
        for op in self.ops:
            if getattr(op, "label_key", None):
                img, labels[op.label_key] = op.labelled(img)
            else:
                img = op(img)
        return img, labels

    def to_chw(self, img, with_labels=False):
        """Apply the ops and return a contiguous float32 CHW array, transposing HWC output (PaddleClas
        datasets transpose after ``transform_ops``, so lists without ``ToCHWImage`` are common).
        ``with_labels``: return ``(array, labels)`` with the labels of ``apply``."""
        img, labels = self.apply(img)
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[None] if self.chw else img[:, :, None]
        if img.ndim != 3:
            raise ValueError(f"transform_ops produced shape {img.shape}; expected an HWC or CHW image")
        if not self.chw:
            img = img.transpose((2, 0, 1))
        img = np.ascontiguousarray(img, dtype=np.float32)
        return (img, labels) if with_labels else img

    def __len__(self):
        return len(self.ops)

    def __repr__(self):
        return f"Compose([{', '.join(type(op).__name__ for op in self.ops)}])"


def _split_entry(entry, where):
    """``{Name: {kwargs} | None}`` -> (name, kwargs)."""
    if isinstance(entry, str):  # "- ToCHWImage" without a colon
        return entry, {}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(where, f"each transform must be a one-key mapping like "
                                 f"'- ResizeImage: {{resize_short: 256}}', got {entry!r}")
    (name, kwargs), = entry.items()
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.{name}", f"arguments must be a mapping or empty, got {kwargs!r}")
    return str(name), kwargs


# Ops whose output depends only on the image (and their parameters): what the frozen backbone's
# feature cache may rely on (engine/frozen.py). Every other op, and an op not listed, is random.
DETERMINISTIC_OPS = frozenset({"DecodeImage", "ResizeImage", "CropImage", "NormalizeImage", "ToCHWImage"})


def is_deterministic(op):
    """True when the ``{name: params}`` op gives the same output for the same image every call."""
    name = next(iter(op)) if isinstance(op, dict) else str(op)
    params = (op.get(name) if isinstance(op, dict) else None) or {}
    if name not in DETERMINISTIC_OPS:
        return False
    # ResizeImage's interpolation: random draws bilinear or bicubic per call
    return str(params.get("interpolation") or "").lower() != "random"


def build_transforms(ops_list, path: str = "transform_ops") -> Compose:
    """Build the YAML list ``[{Name: {kwargs} | None}, ...]`` into one ``Compose``.

    Errors name ``<path>.<index>.<Name>.<key>``, e.g.
    ``DataLoader.Train.dataset.transform_ops.1.RandCropImage.size: ...``.
    """
    if ops_list is None:
        return Compose([])
    if not isinstance(ops_list, (list, tuple)):
        raise ConfigError(path, f"expected a list of transforms, got {type(ops_list).__name__}")
    ops = []
    for i, entry in enumerate(ops_list):
        name, kwargs = _split_entry(entry, f"{path}.{i}")
        where = f"{path}.{i}.{name}"
        TRANSFORMS.get(name, f"{path}.{i}")  # unknown name -> error with the closest match
        try:
            ops.append(TRANSFORMS.build(name, kwargs, where))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # constructor value checks -> config error
            raise ConfigError(where, str(e)) from e
    return Compose(ops)
