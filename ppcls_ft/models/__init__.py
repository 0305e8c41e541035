"""Model zoo. Importing this package registers every family in ``registry.MODELS``."""
from . import mobilenet_v2, pp_lcnet, resnet, swin_transformer  # noqa: F401  (registration)
from ._builder import build_model, list_models, load_pretrained  # noqa: F401
