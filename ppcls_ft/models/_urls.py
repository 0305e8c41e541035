"""Official PaddleClas pretrained-weight URLs, as an explicit table (``Arch.pretrained: true``).

Where each file lives was checked against PaddleClas 2.6 (``MODEL_URLS`` in
``ppcls/arch/backbone/{legendary_models,model_zoo}/*.py`` and ``docs/en/algorithm_introduction/
ImageNet_models_en.md``):

- "legendary" families (ResNet*, ResNet*_vd, PPLCNet_*, SwinTransformer_*) live under
  ``dygraph/legendary_models/``; the MobileNetV2 family is a ``model_zoo`` model under plain
  ``dygraph/``.
- ``use_ssld: true`` swaps ``_pretrained`` for ``_ssld_pretrained``. SSLD files exist only for
  ResNet34_vd, ResNet50_vd, ResNet101_vd, PPLCNet_x0_5, PPLCNet_x1_0, PPLCNet_x2_5 and
  MobileNetV2 (not plain ResNet50, not PPLCNet_x0_25).
- ``pretrained_variant: 22kto1k`` (ImageNet-22k pre-training, ImageNet-1k fine-tuning) exists for
  Swin base and large. Swin large has no ImageNet-1k-only file; PaddleClas defaults it to 22kto1k,
  and so do we (its ``None`` entry is the 22kto1k file).

Nothing here is guessed from a pattern: a name/flag combination missing from the table raises a
``ConfigError`` that lists what does exist.
"""
from ..errors import ConfigError

BASE = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph"
LEGENDARY = BASE + "/legendary_models"

_RESNET = ("ResNet18", "ResNet18_vd", "ResNet34", "ResNet34_vd", "ResNet50", "ResNet50_vd",
           "ResNet101", "ResNet101_vd", "ResNet152", "ResNet152_vd", "ResNet200_vd")
_RESNET_SSLD = ("ResNet34_vd", "ResNet50_vd", "ResNet101_vd")
_PPLCNET = ("PPLCNet_x0_25", "PPLCNet_x0_35", "PPLCNet_x0_5", "PPLCNet_x0_75", "PPLCNet_x1_0",
            "PPLCNet_x1_5", "PPLCNet_x2_0", "PPLCNet_x2_5")
_PPLCNET_SSLD = ("PPLCNet_x0_5", "PPLCNet_x1_0", "PPLCNet_x2_5")
_MOBILENETV2 = ("MobileNetV2_x0_25", "MobileNetV2_x0_5", "MobileNetV2_x0_75", "MobileNetV2",
                "MobileNetV2_x1_5", "MobileNetV2_x2_0")
_MOBILENETV2_SSLD = ("MobileNetV2",)
_SWIN = ("SwinTransformer_tiny_patch4_window7_224", "SwinTransformer_small_patch4_window7_224",
         "SwinTransformer_base_patch4_window7_224", "SwinTransformer_base_patch4_window12_384")
_SWIN_22KTO1K = ("SwinTransformer_base_patch4_window7_224", "SwinTransformer_base_patch4_window12_384",
                 "SwinTransformer_large_patch4_window7_224", "SwinTransformer_large_patch4_window12_384")


def _build_table():
    """name -> {flavour: url}; flavour is None (plain), "ssld" or "22kto1k"."""
    table = {}

    def add(names, root, flavour, suffix):
        for name in names:
            table.setdefault(name, {})[flavour] = f"{root}/{name}{suffix}.pdparams"

    add(_RESNET, LEGENDARY, None, "_pretrained")
    add(_RESNET_SSLD, LEGENDARY, "ssld", "_ssld_pretrained")
    add(_PPLCNET, LEGENDARY, None, "_pretrained")
    add(_PPLCNET_SSLD, LEGENDARY, "ssld", "_ssld_pretrained")
    add(_MOBILENETV2, BASE, None, "_pretrained")
    add(_MOBILENETV2_SSLD, BASE, "ssld", "_ssld_pretrained")
    add(_SWIN, LEGENDARY, None, "_pretrained")
    add(_SWIN_22KTO1K, LEGENDARY, "22kto1k", "_22kto1k_pretrained")
    for name in _SWIN_22KTO1K:  # large: 22kto1k is the only (and PaddleClas's default) file
        table[name].setdefault(None, table[name]["22kto1k"])
    return table


OFFICIAL_URLS = _build_table()
VARIANTS = ("22kto1k",)


def has_official_weights(name) -> bool:
    """True when PaddleClas publishes ImageNet weights for architecture ``name``."""
    return str(name).strip() in OFFICIAL_URLS


def _describe(flavours):
    words = {None: "pretrained: true", "ssld": "use_ssld: true", "22kto1k": "pretrained_variant: 22kto1k"}
    return ", ".join(words[f] for f in sorted(flavours, key=lambda f: (f is not None, str(f))))


def official_url(name, use_ssld=False, variant=None) -> str:
    """URL of the official weights for ``name``; ``ConfigError`` naming the Arch key otherwise."""
    name = str(name).strip()
    if name not in OFFICIAL_URLS:
        raise ConfigError("Arch.pretrained", f"PaddleClas publishes no official weights for {name!r}; "
                          f"set pretrained to a local .pdparams path or URL, or false. Architectures "
                          f"with official weights: {', '.join(sorted(OFFICIAL_URLS))}")
    if variant is not None and variant not in VARIANTS:
        raise ConfigError("Arch.pretrained_variant", f"unknown variant {variant!r}; choose null or "
                          f"one of {', '.join(VARIANTS)}")
    if use_ssld and variant is not None:
        raise ConfigError("Arch.use_ssld", "use_ssld and pretrained_variant cannot both be set; pick one")
    flavours = OFFICIAL_URLS[name]
    flavour = "ssld" if use_ssld else variant
    if flavour not in flavours:
        key = "Arch.use_ssld" if use_ssld else "Arch.pretrained_variant"
        raise ConfigError(key, f"no official {flavour} weights exist for {name}; available for {name}: "
                          f"{_describe(flavours)}")
    return flavours[flavour]
