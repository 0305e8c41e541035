"""Per-image training augmentations: RandomErasing, Cutout, ColorJitter (+ the policy ops).

Every op is a registered transform ``op(img) -> img`` on numpy arrays, spelled as in PaddleClas
YAML. The policy augmentations (``TimmAutoAugment``, ``AutoAugment``, ``RandAugment``) live in
``autoaugment.py`` and are re-exported here, so importing this module registers all six.

Where each op sits in ``transform_ops``:
- ColorJitter and the policy ops: uint8 HWC RGB, before ``NormalizeImage``.
- RandomErasing: after ``NormalizeImage`` on float32 HWC (PaddleClas configs have no ToCHWImage
  before it); CHW input is also accepted, detected by shape.
- Cutout: either side, uint8 or float; it writes zeros (black before, the mean after normalising).

Randomness comes only from python's ``random`` module and numpy's global RNG (``np.random``).
The data loader seeds both per worker and epoch, which is what makes augmentation reproducible
under ``Global.seed``; do not introduce another generator here.

The ops return a new array and never modify their input (PaddleClas writes in place).
"""
import math
import random
from typing import Union

import numpy as np
from PIL import Image, ImageEnhance

from ..errors import ConfigError
from ..registry import TRANSFORMS
from .autoaugment import AutoAugment, RandAugment, TimmAutoAugment, from_pil, to_pil

__all__ = ["RandomErasing", "Cutout", "ColorJitter", "TimmAutoAugment", "AutoAugment",
           "RandAugment"]

_ERASE_MODES = ("const", "rand", "pixel")


def _is_chw(arr):
    """Channel-first when the first axis looks like channels and the last does not."""
    return arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3)


@TRANSFORMS.register
class RandomErasing:
    """Erase one random rectangle (Zhong et al. 2017), after NormalizeImage.

    YAML (values of the Swin configs)::

        - RandomErasing:
            EPSILON: 0.25          # probability of erasing an image
            sl: 0.02               # erased area, fraction of the image: uniform in [sl, sh]
            sh: 1.0/3.0
            r1: 0.3                # aspect ratio h/w in [r1, 1/r1]
            attempt: 10            # tries to fit a box inside the image, then give up
            use_log_aspect: True   # sample the aspect ratio uniformly in log space
            mode: pixel            # const: fill ``mean``; rand: one normal value per channel;
                                   # pixel: normal noise per pixel
            mean: [0., 0., 0.]     # const fill, in normalised units (0 = the dataset mean)
    """

    def __init__(self, EPSILON: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 mean: tuple = (0., 0., 0.), attempt: int = 100, use_log_aspect: bool = False,
                 mode: str = "const"):
        if not 0.0 <= EPSILON <= 1.0:
            raise ConfigError("RandomErasing.EPSILON", f"is a probability in [0, 1], got {EPSILON}")
        if not 0.0 < sl <= sh <= 1.0:
            raise ConfigError("RandomErasing.sl", f"need 0 < sl <= sh <= 1 (area fractions), "
                                                  f"got sl={sl}, sh={sh}")
        if not 0.0 < r1 <= 1.0:
            raise ConfigError("RandomErasing.r1", f"is the smallest aspect ratio, in (0, 1]; got {r1}")
        if attempt < 1:
            raise ConfigError("RandomErasing.attempt", f"must be >= 1, got {attempt}")
        if mode not in _ERASE_MODES:
            raise ConfigError("RandomErasing.mode", f"unknown mode {mode!r}; use one of "
                                                    f"{', '.join(_ERASE_MODES)}")
        if len(mean) not in (1, 3):
            raise ConfigError("RandomErasing.mean", f"expected 1 or 3 values, got {list(mean)!r}")
        self.EPSILON, self.sl, self.sh, self.attempt = EPSILON, sl, sh, attempt
        self.use_log_aspect, self.mode = use_log_aspect, mode
        self.mean = np.asarray(mean, dtype=np.float32)
        # PaddleClas samples log-aspect uniformly in [log r1, log 1/r1] when use_log_aspect is set
        self.aspect_range = (math.log(r1), math.log(1.0 / r1)) if use_log_aspect else (r1, 1.0 / r1)

    def _fill(self, h, w, c, chw, dtype):
        """Values for an h x w box with c channels, shaped for the image layout."""
        if self.mode != "const" and not np.issubdtype(dtype, np.floating):
            raise ValueError(f"RandomErasing mode {self.mode!r} writes normal noise and needs a "
                             f"float image, got {dtype}; put it after NormalizeImage")
        if self.mode == "pixel":
            shape = (c, h, w) if chw else (h, w, c)
            return np.random.normal(size=shape)
        values = np.random.normal(size=c) if self.mode == "rand" else self.mean
        if values.size not in (1, c):
            values = values[:c]
        return values.reshape(-1, 1, 1) if chw else values.reshape(1, 1, -1)

    def __call__(self, img):
        if random.random() > self.EPSILON:
            return img
        arr = np.asarray(img)
        chw = _is_chw(arr)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        height, width, chans = (arr.shape[1], arr.shape[2], arr.shape[0]) if chw else arr.shape
        for _ in range(self.attempt):
            target_area = random.uniform(self.sl, self.sh) * height * width
            aspect = random.uniform(*self.aspect_range)
            if self.use_log_aspect:
                aspect = math.exp(aspect)
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if h < height and w < width:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                out = arr.copy()
                box = (slice(None), slice(top, top + h), slice(left, left + w)) if chw else \
                    (slice(top, top + h), slice(left, left + w))
                out[box] = self._fill(h, w, chans, chw, out.dtype)
                return out.reshape(np.asarray(img).shape)
        return img


def cutout_box(center_y, center_x, length, height, width):
    """Clipped box ``(y1, y2, x1, x2)`` of side ``length`` around a centre (PaddleClas rounding:
    ``center -/+ length // 2``, so an odd length gives a box one pixel shorter)."""
    half = length // 2
    return (max(0, center_y - half), min(height, center_y + half),
            max(0, center_x - half), min(width, center_x + half))


@TRANSFORMS.register
class Cutout:
    """Zero ``n_holes`` square boxes of side ``length`` px with uniform random centres
    (DeVries & Taylor 2017); boxes are clipped at the border, so they may be smaller.

    YAML::

        - Cutout:
            n_holes: 1
            length: 112
    """

    def __init__(self, n_holes: int = 1, length: int = 112):
        if n_holes < 0:
            raise ConfigError("Cutout.n_holes", f"must be >= 0, got {n_holes}")
        if length < 0:
            raise ConfigError("Cutout.length", f"is a side in pixels, >= 0; got {length}")
        self.n_holes = n_holes
        self.length = length

    def __call__(self, img):
        out = np.array(img, copy=True)
        height, width = out.shape[:2]
        for _ in range(self.n_holes):
            center_y = np.random.randint(height)
            center_x = np.random.randint(width)
            y1, y2, x1, x2 = cutout_box(center_y, center_x, self.length, height, width)
            out[y1:y2, x1:x2] = 0
        return out


def _adjust_hue(pil, shift):
    """Rotate the hue by ``shift`` turns (-0.5..0.5) in PIL's 8-bit HSV space."""
    if pil.mode != "RGB":
        return pil
    hsv = np.array(pil.convert("HSV"))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 255))) % 256).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


_JITTER_FNS = {
    "brightness": lambda pil, f: ImageEnhance.Brightness(pil).enhance(f),
    "contrast": lambda pil, f: ImageEnhance.Contrast(pil).enhance(f),
    "saturation": lambda pil, f: ImageEnhance.Color(pil).enhance(f),
    "hue": _adjust_hue,
}


def _jitter_range(name, value):
    """Factor range from a YAML value: x -> [max(0, 1-x), 1+x] (hue: [-x, x]) or [lo, hi] as given.
    Returns None when the op is the identity (value 0), so it is skipped."""
    key = f"ColorJitter.{name}"
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or float(value[0]) > float(value[1]):
            raise ConfigError(key, f"expected a number or [low, high], got {list(value)!r}")
        low, high = float(value[0]), float(value[1])
    else:
        value = float(value)
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
        low, high = (-value, value) if name == "hue" else (max(0.0, 1.0 - value), 1.0 + value)
    if name == "hue" and not -0.5 <= low <= high <= 0.5:
        raise ConfigError(key, f"hue shifts are in [-0.5, 0.5], got [{low}, {high}]")
    if name != "hue" and low < 0:
        raise ConfigError(key, f"factors must be >= 0, got [{low}, {high}]")
    identity = 0.0 if name == "hue" else 1.0
    return None if low == high == identity else (low, high)


@TRANSFORMS.register
class ColorJitter:
    """Random brightness, contrast, saturation and hue, in random order, on uint8 HWC RGB.

    YAML::

        - ColorJitter:
            brightness: 0.4    # factor uniform in [max(0, 1-x), 1+x], or [low, high]
            contrast: 0.4
            saturation: 0.4
            hue: 0.1           # hue shift uniform in [-x, x] turns, x <= 0.5
            p: 1.0             # probability of jittering an image
    """

    def __init__(self, brightness: Union[float, list] = 0., contrast: Union[float, list] = 0.,
                 saturation: Union[float, list] = 0., hue: Union[float, list] = 0., p: float = 1.0):
        if not 0.0 <= p <= 1.0:
            raise ConfigError("ColorJitter.p", f"is a probability in [0, 1], got {p}")
        self.p = p
        given = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.ranges = {}
        for name, value in given.items():
            bounds = _jitter_range(name, value)
            if bounds is not None:
                self.ranges[name] = bounds

    def __call__(self, img):
        if not self.ranges or random.random() >= self.p:
            return img
        pil = to_pil(img, "ColorJitter")
        order = list(self.ranges)
        random.shuffle(order)
        for name in order:
            pil = _JITTER_FNS[name](pil, random.uniform(*self.ranges[name]))
        return from_pil(pil, img)
