"""Per-image training augmentations: RandomErasing, Cutout, ColorJitter, GridMask, HideAndSeek,
PCALighting, and the label-making RandomRot90 / BlurImage (+ the policy ops).

Every op is a registered transform ``op(img) -> img`` on numpy arrays, spelled as in PaddleClas
YAML. The policy augmentations (``TimmAutoAugment``, ``AutoAugment``, ``RandAugment``) live in
``autoaugment.py`` and are re-exported here, so importing this module registers them all.

Where each op sits in ``transform_ops``:
- ColorJitter, BlurImage and the policy ops: uint8 HWC RGB, before ``NormalizeImage``;
  PCALighting too (HWC, float32 out).
- RandomErasing, GridMask, HideAndSeek: after ``NormalizeImage`` on float32 HWC (PaddleClas
  configs have no ToCHWImage before them); CHW input is also accepted, detected by shape.
- Cutout: either side, uint8 or float; it writes ``fill_value`` (zeros by default: black
  before, the mean after normalising). RandomRot90: anywhere.

Randomness comes only from python's ``random`` module and numpy's global RNG (``np.random``).
The data loader seeds both per worker and epoch, which is what makes augmentation reproducible
under ``Global.seed``; do not introduce another generator here.

The ops return a new array and never modify their input (PaddleClas writes in place).
"""
import math
import random
from typing import Optional, Union

import cv2
import numpy as np
from PIL import Image, ImageEnhance

from ..errors import ConfigError
from ..registry import TRANSFORMS
from .autoaugment import AutoAugment, RandAugment, TimmAutoAugment, from_pil, to_pil

__all__ = ["RandomErasing", "Cutout", "ColorJitter", "GridMask", "HideAndSeek", "PCALighting",
           "RandomRot90", "BlurImage", "TimmAutoAugment", "AutoAugment", "RandAugment"]

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
    """Fill ``n_holes`` square boxes of side ``length`` px with uniform random centres
    (DeVries & Taylor 2017); boxes are clipped at the border, so they may be smaller.

    YAML::

        - Cutout:
            n_holes: 1
            length: 112
            fill_value: [0, 0, 0]   # one value per channel (or one number); none: a random
                                    # colour per hole, each channel uniform in 0..255

    The default, zeros, is PaddleClas's declared default; its code crashes with any value
    other than ``none`` (it never stores one), so a given value is used here as written.
    """

    def __init__(self, n_holes: int = 1, length: int = 112,
                 fill_value: Union[list, float, str, None] = (0, 0, 0)):
        if n_holes < 0:
            raise ConfigError("Cutout.n_holes", f"must be >= 0, got {n_holes}")
        if length < 0:
            raise ConfigError("Cutout.length", f"is a side in pixels, >= 0; got {length}")
        if isinstance(fill_value, str) and fill_value.lower() != "none":
            raise ConfigError("Cutout.fill_value", f"expected a number, a list of channel values "
                                                   f"or none (random colour), got {fill_value!r}")
        if isinstance(fill_value, str) or fill_value is None:
            fill_value = None
        elif isinstance(fill_value, (list, tuple)):
            if len(fill_value) not in (1, 3):
                raise ConfigError("Cutout.fill_value", f"expected 1 or 3 values, got {list(fill_value)!r}")
            fill_value = [float(v) for v in fill_value]
        else:
            fill_value = [float(fill_value)]
        self.n_holes = n_holes
        self.length = length
        self.fill_value = fill_value

    def _fill(self, channels):
        if self.fill_value is not None:
            return np.asarray(self.fill_value[:channels] if len(self.fill_value) > 1
                              else self.fill_value * channels)
        # PaddleClas draws one colour per hole with python random: one value, or three
        return np.asarray([random.randint(0, 255) for _ in range(channels if channels == 1 else 3)])

    def __call__(self, img):
        out = np.array(img, copy=True)
        height, width = out.shape[:2]
        channels = 1 if out.ndim == 2 else out.shape[2]
        for _ in range(self.n_holes):
            center_y = np.random.randint(height)
            center_x = np.random.randint(width)
            y1, y2, x1, x2 = cutout_box(center_y, center_x, self.length, height, width)
            fill = self._fill(channels)
            out[y1:y2, x1:x2] = fill[0] if out.ndim == 2 else fill.reshape(1, 1, -1)
        return out


def _hw_axes(arr):
    """(height axis, width axis) of an HWC, CHW or HW array."""
    return (1, 2) if _is_chw(arr) else (0, 1)


@TRANSFORMS.register
class GridMask:
    """GridMask (Chen et al. 2020): zero a grid of square-ish stripes, uint8 or float, HWC or CHW.

    YAML (PaddleClas's ResNet50_GridMask.yaml)::

        - GridMask:
            d1: 96        # grid period d uniform in [d1, d2) pixels
            d2: 224
            rotate: 1     # mask rotated by an integer angle uniform in [0, rotate) degrees
            ratio: 0.5    # kept fraction: each period hides a band of round(d * ratio) pixels
            mode: 0       # 0: hide the bands; 1: keep only the bands
            prob: 1.0     # probability of masking an image

    The mask is drawn as PaddleClas draws it: on a 1.5x canvas, horizontal and vertical bands
    from random offsets in [0, d), rotated with PIL, centre-cropped to the image, then multiplied
    in. Two PaddleClas defects are not kept (docs/compat.md): its probability ramps with a
    module-global epoch counter its trainer never advances, so there GridMask never fires, and
    it reads the layout as CHW while its configs pass HWC, so there the mask lands on the
    width x channel axes.
    """

    def __init__(self, d1: int = 96, d2: int = 224, rotate: int = 1, ratio: float = 0.5,
                 mode: int = 0, prob: float = 1.0):
        if not 0 < d1 < d2:
            raise ConfigError("GridMask.d1", f"need 0 < d1 < d2 (grid period range in pixels), "
                                             f"got d1={d1}, d2={d2}")
        if rotate < 1:
            raise ConfigError("GridMask.rotate", f"must be >= 1 (angle drawn in [0, rotate)), got {rotate}")
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError("GridMask.ratio", f"is a fraction in [0, 1], got {ratio}")
        if mode not in (0, 1):
            raise ConfigError("GridMask.mode", f"must be 0 (hide bands) or 1 (keep bands), got {mode}")
        if not 0.0 <= prob <= 1.0:
            raise ConfigError("GridMask.prob", f"is a probability in [0, 1], got {prob}")
        self.d1, self.d2, self.rotate, self.ratio = d1, d2, rotate, ratio
        self.mode, self.prob = mode, prob

    def mask(self, height, width):
        """A float32 [height, width] mask of 0/1 (random draws in PaddleClas's order)."""
        canvas_h, canvas_w = int(1.5 * height), int(1.5 * width)
        d = np.random.randint(self.d1, self.d2)
        band = int(d * self.ratio + 0.5)
        mask = np.ones((canvas_h, canvas_w), np.float32)
        start_h, start_w = np.random.randint(d), np.random.randint(d)
        for i in range(-1, canvas_h // d + 1):
            lo = min(max(d * i + start_h, 0), canvas_h)
            mask[lo:min(max(d * i + start_h + band, 0), canvas_h), :] = 0
        for i in range(-1, canvas_w // d + 1):
            lo = min(max(d * i + start_w, 0), canvas_w)
            mask[:, lo:min(max(d * i + start_w + band, 0), canvas_w)] = 0
        angle = np.random.randint(self.rotate)
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).rotate(angle), np.float32)
        top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
        mask = mask[top:top + height, left:left + width]
        return 1.0 - mask if self.mode == 1 else mask

    def __call__(self, img):
        if np.random.rand() > self.prob:
            return img
        arr = np.asarray(img)
        h_axis, w_axis = _hw_axes(arr)
        mask = self.mask(arr.shape[h_axis], arr.shape[w_axis])
        shape = [1] * arr.ndim
        shape[h_axis], shape[w_axis] = mask.shape
        return (arr * mask.reshape(shape)).astype(arr.dtype)


@TRANSFORMS.register
class HideAndSeek:
    """Hide-and-Seek (Singh & Lee 2017): cut the image into square cells and zero each with
    probability 0.5; the cell side is drawn per image from 0 (no hiding), 16, 32, 44, 56 px.

    YAML: ``- HideAndSeek:`` (no options, as in PaddleClas). HWC or CHW, any dtype. PaddleClas
    reads the layout as CHW while its config passes HWC, so there it hides only the first three
    columns' channels; here the cells cover height x width (docs/compat.md).
    """

    GRID_SIZES = (0, 16, 32, 44, 56)
    HIDE_PROB = 0.5

    def __call__(self, img):
        grid = int(np.random.choice(self.GRID_SIZES))
        if grid == 0:
            return img
        out = np.array(img, copy=True)
        h_axis, w_axis = _hw_axes(out)
        height, width = out.shape[h_axis], out.shape[w_axis]
        index = [slice(None)] * out.ndim
        for x in range(0, width, grid):  # columns outer, rows inner: PaddleClas's draw order
            for y in range(0, height, grid):
                if random.random() <= self.HIDE_PROB:
                    index[h_axis], index[w_axis] = slice(y, y + grid), slice(x, x + grid)
                    out[tuple(index)] = 0
        return out


# AlexNet's PCA of ImageNet RGB pixels (values in 0..1), as used by PaddleClas and the DBB repo
_PCA_EIGVAL = np.asarray([0.2175, 0.0188, 0.0045], np.float32)
_PCA_EIGVEC = np.asarray([[-0.5675, 0.7192, 0.4009],
                          [-0.5808, -0.0045, -0.8140],
                          [-0.5836, -0.6948, 0.4203]], np.float32)


@TRANSFORMS.register
class PCALighting:
    """AlexNet-style lighting noise: add ``eigvec @ (alpha * eigval)`` to every pixel, with
    ``alpha ~ N(0, 0.1)`` per channel, drawn once per image. HWC RGB in, float32 HWC out.

    YAML: ``- PCALighting:`` (no options, as in PaddleClas). The eigenvalues are for pixels in
    0..1; PaddleClas's ResNet18_dbb.yaml puts the op before NormalizeImage, on 0..255 pixels,
    where the shift is a few hundredths of a grey level. That placement and scale are kept, so
    the config trains as it does in PaddleClas.
    """

    ALPHA_STD = 0.1

    def __call__(self, img):
        alpha = np.random.normal(0, self.ALPHA_STD, size=3).astype(np.float32)
        shift = (_PCA_EIGVEC * alpha[None, :] * _PCA_EIGVAL[None, :]).sum(axis=1)
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"PCALighting expects an HWC RGB image, got shape {arr.shape}; put it "
                             "before ToCHWImage")
        return arr.astype(np.float32) + shift.reshape(1, 1, 3)


class _LabellingOp:
    """An op that also returns a label describing what it did (see ``Compose.apply``)."""

    label_key = None
    label_count = 0  # labels are 0..label_count-1

    def labelled(self, img):
        raise NotImplementedError

    def __call__(self, img):
        return self.labelled(img)[0]


@TRANSFORMS.register
class RandomRot90(_LabellingOp):
    """Rotate by k x 90 degrees counter-clockwise, k uniform in 0..3; the label is k.

    YAML: ``- RandomRot90:``. With ``CustomLabelDataset`` and ``label_key:
    random_rot90_orientation`` (PaddleClas's image_orientation PULC model) k is the class.
    """

    label_key = "random_rot90_orientation"
    label_count = 4

    def labelled(self, img):
        k = random.choice([0, 1, 2, 3])
        arr = np.asarray(img)
        if k:
            arr = np.ascontiguousarray(np.rot90(arr, k, axes=_hw_axes(arr)))
        return arr, k


@TRANSFORMS.register
class BlurImage(_LabellingOp):
    """Blur with probability ``ratio`` (Gaussian or motion, chosen evenly); the label is 1 when
    blurred, else 0. uint8 HWC in and out.

    YAML (PaddleClas's clarity_assessment PULC model, with ``CustomLabelDataset`` and
    ``label_key: blur_image``)::

        - BlurImage:
            ratio: 0.5
            gaussian_max_ksize: 12   # Gaussian kernel sides odd in [5, max)
            motion_max_ksize: 12     # motion kernel length odd in [5, max)
            motion_max_angle: 45     # motion direction integer degrees in [-max, max)

    A motion-blurred image is stretched back to the full 0..255 range (min-max), as in PaddleClas.
    """

    label_key = "blur_image"
    label_count = 2

    def __init__(self, ratio: float = 0.5, motion_max_ksize: int = 12, motion_max_angle: int = 45,
                 gaussian_max_ksize: int = 12):
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError("BlurImage.ratio", f"is a probability in [0, 1], got {ratio}")
        for key, value in (("motion_max_ksize", motion_max_ksize),
                           ("gaussian_max_ksize", gaussian_max_ksize)):
            if value <= 5:
                raise ConfigError(f"BlurImage.{key}", f"must be > 5 (odd kernel sizes from 5 up), got {value}")
        if motion_max_angle < 1:
            raise ConfigError("BlurImage.motion_max_angle", f"must be >= 1 degree, got {motion_max_angle}")
        self.ratio = ratio
        self.motion_max_ksize = motion_max_ksize
        self.motion_max_angle = motion_max_angle
        self.gaussian_max_ksize = gaussian_max_ksize

    def _gaussian(self, img):
        sides = np.arange(5, self.gaussian_max_ksize, 2)
        ksize = (int(np.random.choice(sides)), int(np.random.choice(sides)))
        return cv2.GaussianBlur(img, ksize, 0)

    def _motion(self, img):
        length = int(np.random.choice(np.arange(5, self.motion_max_ksize, 2)))
        angle = int(np.random.choice(np.arange(-self.motion_max_angle, self.motion_max_angle)))
        turn = cv2.getRotationMatrix2D((length / 2, length / 2), angle, 1)
        kernel = cv2.warpAffine(np.diag(np.ones(length)), turn, (length, length)) / length
        blurred = cv2.filter2D(img, -1, kernel)
        cv2.normalize(blurred, blurred, 0, 255, cv2.NORM_MINMAX)
        return np.asarray(blurred, dtype=np.uint8)

    def labelled(self, img):
        if random.random() > self.ratio:
            return img, 0
        arr = np.ascontiguousarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"BlurImage expects a uint8 image, got {arr.dtype}; put it before "
                             "NormalizeImage")
        method = random.choice(["gaussian", "motion"])
        return (self._gaussian(arr) if method == "gaussian" else self._motion(arr)), 1


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
            p: 1.0             # probability of jittering an image (PaddleClas spells it prob;
                               # both are accepted, prob >= 1 means always, as there)
    """

    def __init__(self, brightness: Union[float, list] = 0., contrast: Union[float, list] = 0.,
                 saturation: Union[float, list] = 0., hue: Union[float, list] = 0., p: float = 1.0,
                 prob: Optional[float] = None):
        if prob is not None:
            # PaddleClas's default prob is 2 ("always"); a probability above 1 means the same here
            p = min(float(prob), 1.0)
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
