"""Policy augmentations: ``TimmAutoAugment`` (timm grammar), ``AutoAugment`` and ``RandAugment``.

Three registered transforms that pick image operations (rotate, shear, solarize, ...) from a
policy and apply them with PIL, as timm and PaddleClas do. They take and return numpy HWC uint8
RGB arrays, so they belong before ``NormalizeImage`` in ``transform_ops``.

- ``TimmAutoAugment`` parses timm's config strings (``rand-m9-mstd0.5-inc1``, ``original-mstd0.5``,
  ``v0``) with timm's magnitude-to-argument formulas (level / 10 scaling, random sign, magnitude
  noise clipped to ``[0, mmax or 10]``). It is what the Swin configs use.
- ``AutoAugment`` / ``RandAugment`` are PaddleClas's own ImageNet policy (10 magnitude bins) and
  uniform RandAugment.

Randomness comes only from python's ``random`` module and numpy's global RNG (``np.random``); the
data loader seeds both per worker and epoch, which is what makes augmentation reproducible.
No other generator (``np.random.default_rng``, paddle) is used here on purpose.

Deliberate differences from the originals, each a silent defect there:
- timm reads ``inc0`` as "increasing" (``bool("0")`` is True); here ``inc0`` means off.
- timm skips tokens it cannot parse; here an unknown token is a ConfigError naming it.
- PaddleClas ``RandAugment`` keeps ``int(4 * m / 10)`` posterize bits and solarizes above
  ``256 * m / 10``, so magnitude 0 blackens or inverts the image and severity *falls* with
  magnitude. Here both grow with magnitude, in the same direction as PaddleClas's own AutoAugment
  bins: bits ``8 - int(4 * m / 10)``, threshold ``256 - 256 * m / 10``.
"""
import random
import re
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ConfigError
from ..registry import TRANSFORMS

_LEVEL_DENOM = 10.0  # timm and PaddleClas both express magnitude on a 0..10 scale
_GRAY = (128, 128, 128)
_AFFINE = Image.Transform.AFFINE
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
_RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # timm's "random"


# ---------------------------------------------------------------- numpy <-> PIL

def to_pil(img, op_name):
    """uint8 HWC (3 channels) or HW array -> PIL image; anything else is a pipeline-order error."""
    if isinstance(img, Image.Image):
        return img
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"{op_name} expects a uint8 image, got {arr.dtype}; put it before "
                         "NormalizeImage in transform_ops")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"{op_name} expects HWC RGB or HW gray, got shape {arr.shape}; "
                         "put it before ToCHWImage")
    return Image.fromarray(np.ascontiguousarray(arr))


def from_pil(pil, like):
    """PIL image -> numpy with the layout of the input array ``like`` (keeps an HW1 channel)."""
    out = np.asarray(pil)
    if isinstance(like, np.ndarray) and like.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out


def _fill_for(pil, fill):
    return fill[0] if pil.mode == "L" else tuple(fill)


def _resample(resample):
    # a tuple means "choose per call" (timm's interpolation='random')
    return random.choice(resample) if isinstance(resample, tuple) else resample


# ---------------------------------------------------------------- PIL image operations
# Each takes (PIL image, argument) plus fill/resample for the geometric ones.

def auto_contrast(img, _arg=None):
    return ImageOps.autocontrast(img)


def equalize(img, _arg=None):
    return ImageOps.equalize(img)


def invert(img, _arg=None):
    return ImageOps.invert(img)


def posterize(img, bits):
    """Keep the top ``bits`` bits (0..8). Own LUT: Pillow >= 10 rejects 0 bits, which timm's
    non-increasing Posterize reaches at low magnitude (a black image, as in TF)."""
    bits = max(0, int(bits))
    if bits >= 8:
        return img
    mask = 0xFF & ~((1 << (8 - bits)) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def solarize(img, threshold):
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add, threshold=128):
    """Add ``add`` to pixels below ``threshold`` (saturating at 255); timm's SolarizeAdd."""
    lut = [min(255, i + int(add)) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def enhance_color(img, factor):
    return ImageEnhance.Color(img).enhance(factor)


def enhance_contrast(img, factor):
    return ImageEnhance.Contrast(img).enhance(factor)


def enhance_brightness(img, factor):
    return ImageEnhance.Brightness(img).enhance(factor)


def enhance_sharpness(img, factor):
    return ImageEnhance.Sharpness(img).enhance(factor)


def rotate(img, degrees, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return img.rotate(degrees, resample=_resample(resample), fillcolor=_fill_for(img, fill))


def _affine(img, matrix, fill, resample):
    # PIL maps each output pixel (x, y) to input (a x + b y + c, d x + e y + f)
    return img.transform(img.size, _AFFINE, matrix, resample=_resample(resample),
                         fillcolor=_fill_for(img, fill))


def shear_x(img, factor, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x(img, pixels, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return _affine(img, (1, 0, pixels, 0, 1, 0), fill, resample)


def translate_y(img, pixels, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return _affine(img, (1, 0, 0, 0, 1, pixels), fill, resample)


def translate_x_rel(img, fraction, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return translate_x(img, fraction * img.size[0], fill, resample)


def translate_y_rel(img, fraction, fill=_GRAY, resample=Image.Resampling.NEAREST):
    return translate_y(img, fraction * img.size[1], fill, resample)


GEOMETRIC_OPS = frozenset({rotate, shear_x, shear_y, translate_x, translate_y,
                           translate_x_rel, translate_y_rel})


# ---------------------------------------------------------------- timm magnitude -> argument

def _random_sign(v):
    return -v if random.random() > 0.5 else v  # timm's _randomly_negate


def _frac(level):
    return level / _LEVEL_DENOM


def _posterize_bits(level):
    return int(_frac(level) * 4)


def _increasing_factor(level):
    # enhance factor 1 +/- 0.9 * m / 10: identity at m0, stronger either way as m grows
    return max(0.1, 1.0 + _random_sign(_frac(level) * 0.9))


def _solarize_threshold(level):
    return min(256, int(_frac(level) * 256))


# name -> (PIL operation, level -> argument). Formulas follow timm's auto_augment.py.
_TIMM_OPS = {
    "AutoContrast": (auto_contrast, lambda lv, hp: None),
    "Equalize": (equalize, lambda lv, hp: None),
    "Invert": (invert, lambda lv, hp: None),
    "Rotate": (rotate, lambda lv, hp: _random_sign(_frac(lv) * 30.0)),  # degrees
    "Posterize": (posterize, lambda lv, hp: _posterize_bits(lv)),  # bits kept, 0..4
    "PosterizeIncreasing": (posterize, lambda lv, hp: 4 - _posterize_bits(lv)),
    "PosterizeOriginal": (posterize, lambda lv, hp: _posterize_bits(lv) + 4),  # 4..8
    "Solarize": (solarize, lambda lv, hp: _solarize_threshold(lv)),
    "SolarizeIncreasing": (solarize, lambda lv, hp: 256 - _solarize_threshold(lv)),
    "SolarizeAdd": (solarize_add, lambda lv, hp: min(128, int(_frac(lv) * 110))),
    "Color": (enhance_color, lambda lv, hp: _frac(lv) * 1.8 + 0.1),
    "ColorIncreasing": (enhance_color, lambda lv, hp: _increasing_factor(lv)),
    "Contrast": (enhance_contrast, lambda lv, hp: _frac(lv) * 1.8 + 0.1),
    "ContrastIncreasing": (enhance_contrast, lambda lv, hp: _increasing_factor(lv)),
    "Brightness": (enhance_brightness, lambda lv, hp: _frac(lv) * 1.8 + 0.1),
    "BrightnessIncreasing": (enhance_brightness, lambda lv, hp: _increasing_factor(lv)),
    "Sharpness": (enhance_sharpness, lambda lv, hp: _frac(lv) * 1.8 + 0.1),
    "SharpnessIncreasing": (enhance_sharpness, lambda lv, hp: _increasing_factor(lv)),
    "ShearX": (shear_x, lambda lv, hp: _random_sign(_frac(lv) * 0.3)),
    "ShearY": (shear_y, lambda lv, hp: _random_sign(_frac(lv) * 0.3)),
    "TranslateX": (translate_x, lambda lv, hp: _random_sign(_frac(lv) * hp["translate_const"])),
    "TranslateY": (translate_y, lambda lv, hp: _random_sign(_frac(lv) * hp["translate_const"])),
    "TranslateXRel": (translate_x_rel, lambda lv, hp: _random_sign(_frac(lv) * 0.45)),
    "TranslateYRel": (translate_y_rel, lambda lv, hp: _random_sign(_frac(lv) * 0.45)),
}

# timm's RandAugment op sets; the two lists line up index by index (used by the 'w' weights)
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                              "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's experimental choice weights 'w0', in RAND_TRANSFORMS order (normalised at use)
_RAND_WEIGHTS_0 = (0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025,
                   0.2, 0.2, 0.1, 0.1)


class TimmOp:
    """One timm AugmentOp: fires with ``prob``, jitters the magnitude, maps it to an argument."""

    def __init__(self, name, prob, magnitude, hparams):
        self.name = name
        self.fn, self.level_fn = _TIMM_OPS[name]
        self.prob = prob
        self.magnitude = magnitude
        self.hparams = hparams

    def __call__(self, img):
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        level = self.magnitude
        std = self.hparams["magnitude_std"]
        if std == float("inf"):
            level = random.uniform(0.0, level)  # timm: mstd > 100 means uniform in [0, m]
        elif std > 0:
            level = random.gauss(level, std)
        level = max(0.0, min(level, self.hparams["magnitude_max"] or _LEVEL_DENOM))
        arg = self.level_fn(level, self.hparams)
        if self.fn in GEOMETRIC_OPS:
            return self.fn(img, arg, fill=self.hparams["fill"], resample=self.hparams["resample"])
        return self.fn(img) if arg is None else self.fn(img, arg)

    def __repr__(self):
        return f"TimmOp({self.name}, p={self.prob}, m={self.magnitude})"


# ImageNet policy of the AutoAugment paper (arXiv:1805.09501): (op, probability, level) pairs.
# timm 'original' and PaddleClas AutoAugment both use it; timm maps Posterize to PosterizeOriginal.
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("Posterize", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)
# timm 'v0': the TPU EfficientNet ImageNet policy
POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)), (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)), (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)), (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)), (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)), (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)), (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)), (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)), (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)), (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)), (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)), (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)), (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
# policy name -> (table, what 'Posterize' means in it); the 'r' variants use timm's research posterize
_TIMM_POLICIES = {"original": (IMAGENET_POLICY, "PosterizeOriginal"),
                  "originalr": (IMAGENET_POLICY, "PosterizeIncreasing"),
                  "v0": (POLICY_V0, "Posterize"), "v0r": (POLICY_V0, "PosterizeIncreasing")}

_TOKEN = re.compile(r"^([a-z]+)(\d[\d.]*)$")
_CONFIG_PATH = "TimmAutoAugment.config_str"


def parse_config_str(config_str):
    """Parse a timm config string into a plain dict; ConfigError names any bad token.

    ``rand-m9-n2-mstd0.5-mmax10-inc1-w0-p0.5`` -> kind 'rand' with those values;
    ``original-mstd0.5`` / ``v0`` -> kind 'policy'. Defaults are timm's: m 10, n 2, p 0.5.
    """
    parts = str(config_str).strip().split("-")
    head = parts[0]
    if head == "augmix":
        raise ConfigError(_CONFIG_PATH, f"{config_str!r}: augmix is not supported; use a "
                                        "'rand-...' string (e.g. rand-m9-mstd0.5-inc1) or 'original'")
    if head != "rand" and head not in _TIMM_POLICIES:
        raise ConfigError(_CONFIG_PATH, f"unknown policy token {head!r} in {config_str!r}; "
                                        f"valid: rand, {', '.join(_TIMM_POLICIES)}")
    cfg = {"kind": "rand" if head == "rand" else "policy", "policy": head,
           "magnitude": _LEVEL_DENOM, "num_layers": 2, "magnitude_std": 0.0,
           "magnitude_max": None, "increasing": False, "weight_idx": None, "prob": 0.5}
    allowed = {"m", "n", "mstd", "mmax", "inc", "w", "p"} if head == "rand" else {"mstd"}
    for token in parts[1:]:
        match = _TOKEN.match(token)
        if not match or match.group(1) not in allowed:
            raise ConfigError(_CONFIG_PATH, f"unknown token {token!r} in {config_str!r}; "
                                            f"valid after {head!r}: {', '.join(sorted(allowed))} "
                                            "each followed by a number")
        key, text = match.groups()
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(_CONFIG_PATH, f"bad number in token {token!r} of {config_str!r}") from None
        if key == "mstd":
            cfg["magnitude_std"] = float("inf") if value > 100 else value  # timm: >100 = uniform
        elif key == "mmax":
            cfg["magnitude_max"] = value
        elif key == "inc":
            cfg["increasing"] = value != 0
        elif key == "m":
            cfg["magnitude"] = value
        elif key == "n":
            cfg["num_layers"] = int(value)
        elif key == "w":
            if int(value) != 0:
                raise ConfigError(_CONFIG_PATH, f"token {token!r}: only weight set w0 exists")
            cfg["weight_idx"] = 0
        else:
            cfg["prob"] = value
    return cfg


def _resample_from_name(interpolation):
    if interpolation in (None, "random"):
        return _RANDOM_RESAMPLE
    key = str(interpolation).lower()
    if key not in _RESAMPLE:
        raise ConfigError("TimmAutoAugment.interpolation",
                          f"unknown interpolation {interpolation!r}; use one of "
                          f"{', '.join(_RESAMPLE)} or random")
    return _RESAMPLE[key]


# PaddleClas's TimmAutoAugment fills with the ImageNet mean when no mean is given (timm's default)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _fill_from_mean(mean):
    if mean is None:
        mean = _IMAGENET_MEAN
    values = [float(m) for m in mean]
    if len(values) != 3 or not all(0.0 <= m <= 1.0 for m in values):
        raise ConfigError("TimmAutoAugment.mean", f"expected 3 channel means in 0..1 (the "
                                                  f"NormalizeImage mean), got {list(mean)!r}")
    return tuple(min(255, int(round(255 * m))) for m in values)


@TRANSFORMS.register
class TimmAutoAugment:
    """timm RandAugment / AutoAugment from a config string, on uint8 HWC RGB.

    YAML (PaddleClas spelling)::

        - TimmAutoAugment:
            config_str: rand-m9-mstd0.5-inc1   # or original-mstd0.5, v0, originalr, v0r
            interpolation: bicubic             # bilinear | bicubic | nearest | random
            img_size: 224                      # translate_const = 0.45 x min(img_size)
            mean: [0.485, 0.456, 0.406]        # fill = round(255 x mean): (124, 116, 104) by default
            prob: 1.0                          # probability of augmenting an image at all

    ``rand`` tokens: ``m`` magnitude (0..10, default 10), ``n`` ops per image (2), ``mstd``
    magnitude noise std (>100: uniform in [0, m]), ``mmax`` magnitude clip (10), ``inc1`` the
    increasing-severity op set, ``w0`` timm's weighted op choice, ``p`` per-op probability (0.5).
    """

    def __init__(self, config_str: str = "rand-m9-mstd0.5-inc1",
                 interpolation: Optional[str] = "bicubic", img_size: Union[int, list] = 224,
                 mean: Optional[list] = None, prob: float = 1.0):
        if not 0.0 <= prob <= 1.0:
            raise ConfigError("TimmAutoAugment.prob", f"is a probability in [0, 1], got {prob}")
        # PaddleClas's wrapper: one python-random draw per image decides whether the policy runs
        # at all (PULC configs set prob: 0.0 to switch it off); the per-op p token is separate.
        self.prob = float(prob)
        self.config = parse_config_str(config_str)
        sizes = list(img_size) if isinstance(img_size, (list, tuple)) else [img_size]
        if not sizes or min(int(s) for s in sizes) <= 0:
            raise ConfigError("TimmAutoAugment.img_size", f"expected a positive size, got {img_size!r}")
        self.hparams = {"magnitude_std": self.config["magnitude_std"],
                        "magnitude_max": self.config["magnitude_max"],
                        "fill": _fill_from_mean(mean), "resample": _resample_from_name(interpolation),
                        "translate_const": int(min(int(s) for s in sizes) * 0.45)}
        self.num_layers = self.config["num_layers"]
        self.magnitude = self.config["magnitude"]
        self.magnitude_std = self.config["magnitude_std"]
        self.increasing = self.config["increasing"]
        self.ops, self.sub_policies, self.weights = [], [], None
        if self.config["kind"] == "rand":
            self._build_rand()
        else:
            table, posterize_name = _TIMM_POLICIES[self.config["policy"]]
            self.sub_policies = [[TimmOp(posterize_name if n == "Posterize" else n, p, lv, self.hparams)
                                  for n, p, lv in sub] for sub in table]

    def _build_rand(self):
        names = RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS
        self.ops = [TimmOp(n, self.config["prob"], self.magnitude, self.hparams) for n in names]
        if self.config["weight_idx"] is not None:
            weights = np.asarray(_RAND_WEIGHTS_0, dtype=np.float64)
            self.weights = weights / weights.sum()
        # weighted choice is without replacement (timm), so n cannot exceed the non-zero weights
        if self.weights is not None and self.num_layers > np.count_nonzero(self.weights):
            raise ConfigError(_CONFIG_PATH, f"n{self.num_layers} exceeds the "
                                            f"{np.count_nonzero(self.weights)} ops weighted by w0")

    def __call__(self, img):
        if not random.random() < self.prob:
            return img
        pil = to_pil(img, "TimmAutoAugment")
        if self.config["kind"] == "rand":
            picks = np.random.choice(len(self.ops), self.num_layers,
                                     replace=self.weights is None, p=self.weights)
            for i in picks:
                pil = self.ops[int(i)](pil)
        else:
            for op in random.choice(self.sub_policies):
                pil = op(pil)
        return from_pil(pil, img)


# ---------------------------------------------------------------- PaddleClas AutoAugment / RandAugment

# PaddleClas ImageNetPolicy: argument per magnitude bin 0..9 (translate is a fraction of the side)
_BINS = {"ShearX": np.linspace(0, 0.3, 10), "ShearY": np.linspace(0, 0.3, 10),
         "TranslateX": np.linspace(0, 150 / 331, 10), "TranslateY": np.linspace(0, 150 / 331, 10),
         "Rotate": np.linspace(0, 30, 10), "Color": np.linspace(0.0, 0.9, 10),
         "Posterize": np.round(np.linspace(8, 4, 10)).astype(int), "Solarize": np.linspace(256, 0, 10),
         "Contrast": np.linspace(0.0, 0.9, 10), "Sharpness": np.linspace(0.0, 0.9, 10),
         "Brightness": np.linspace(0.0, 0.9, 10)}
_ENHANCE = {"Color": enhance_color, "Contrast": enhance_contrast, "Sharpness": enhance_sharpness,
            "Brightness": enhance_brightness}
_PLAIN = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
          "Posterize": posterize, "Solarize": solarize}


def apply_paddle_op(name, img, magnitude, fill):
    """One PaddleClas policy op; signed ops draw their sign with ``random.choice([-1, 1])``."""
    if name in _PLAIN:
        return _PLAIN[name](img, magnitude)
    sign = random.choice([-1, 1])
    if name in _ENHANCE:
        return _ENHANCE[name](img, 1.0 + magnitude * sign)
    if name == "ShearX":
        return shear_x(img, magnitude * sign, fill, Image.Resampling.BICUBIC)
    if name == "ShearY":
        return shear_y(img, magnitude * sign, fill, Image.Resampling.BICUBIC)
    if name == "TranslateX":
        return translate_x_rel(img, magnitude * sign, fill)
    if name == "TranslateY":
        return translate_y_rel(img, magnitude * sign, fill)
    if name == "Rotate":
        return rotate(img, magnitude * sign, fill)
    raise KeyError(name)


@TRANSFORMS.register
class AutoAugment:
    """PaddleClas ImageNet AutoAugment policy on uint8 HWC RGB (fill gray 128).

    YAML::

        - AutoAugment:

    One of the paper's 25 sub-policies per image; each of its two ops fires with its own
    probability, at a magnitude bin 0..9 (see ``_BINS``).
    """

    def __init__(self):
        self.policy = IMAGENET_POLICY
        self.fill = _GRAY

    def __call__(self, img):
        pil = to_pil(img, "AutoAugment")
        sub = self.policy[random.randint(0, len(self.policy) - 1)]
        for name, prob, level in sub:
            if random.random() < prob:
                magnitude = _BINS[name][level] if name in _BINS else None
                pil = apply_paddle_op(name, pil, magnitude, self.fill)
        return from_pil(pil, img)


@TRANSFORMS.register
class RandAugment:
    """PaddleClas RandAugment on uint8 HWC RGB: ``num_layers`` uniformly chosen ops per image.

    YAML::

        - RandAugment:
            num_layers: 2
            magnitude: 5                  # 0..10
            fillcolor: [128, 128, 128]

    Posterize and solarize severity grows with magnitude here (PaddleClas inverts them; see the
    module docstring).
    """

    OP_NAMES = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Color", "Posterize",
                "Solarize", "Contrast", "Sharpness", "Brightness", "AutoContrast", "Equalize",
                "Invert")

    def __init__(self, num_layers: int = 2, magnitude: float = 5, fillcolor: tuple = (128, 128, 128)):
        if num_layers < 0:
            raise ConfigError("RandAugment.num_layers", f"must be >= 0, got {num_layers}")
        if not 0 <= magnitude <= _LEVEL_DENOM:
            raise ConfigError("RandAugment.magnitude", f"must be in 0..10, got {magnitude}")
        if len(fillcolor) != 3 or not all(0 <= int(c) <= 255 for c in fillcolor):
            raise ConfigError("RandAugment.fillcolor", f"expected 3 values in 0..255, got {fillcolor!r}")
        self.num_layers = num_layers
        self.magnitude = magnitude
        self.fill = tuple(int(c) for c in fillcolor)
        level = magnitude / _LEVEL_DENOM
        self.level_map = {"ShearX": 0.3 * level, "ShearY": 0.3 * level,
                          "TranslateX": 150.0 / 331 * level, "TranslateY": 150.0 / 331 * level,
                          "Rotate": 30.0 * level, "Color": 0.9 * level, "Contrast": 0.9 * level,
                          "Sharpness": 0.9 * level, "Brightness": 0.9 * level,
                          "Posterize": 8 - int(4.0 * level),  # bits kept: 8 (m0) .. 4 (m10)
                          "Solarize": 256.0 - 256.0 * level,  # threshold: 256 (m0, no-op) .. 0
                          "AutoContrast": None, "Equalize": None, "Invert": None}

    def __call__(self, img):
        pil = to_pil(img, "RandAugment")
        for _ in range(self.num_layers):
            name = self.OP_NAMES[np.random.randint(len(self.OP_NAMES))]
            pil = apply_paddle_op(name, pil, self.level_map[name], self.fill)
        return from_pil(pil, img)
