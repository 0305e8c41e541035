"""ppcls_ft: fine-tune pretrained PaddleClas image classifiers.

Public entry points: ``train``, ``evaluate``, ``export`` (``ppcls_ft/api.py``), ``Predictor``, ``load_config``,
``build_model``, ``list_models``; imported lazily, so that ``import ppcls_ft.data`` does not pay
for the model zoo.
"""
import warnings

from ._cpu import prepare_cpu_env

# Paddle warns about a missing ccache on every import (it only matters when compiling custom ops).
warnings.filterwarnings("ignore", message="No ccache found")
# Paddle 3's BatchNorm warns on every training forward that it tracks running statistics, which
# is what batch norm does; the notice otherwise becomes the first line of stderr of every run,
# above the one line an error is reported in.
warnings.filterwarnings("ignore", message="When training, we now always track global mean")

# Must run before the first ``import paddle`` anywhere in the process (see _cpu.py).
CPU_VENDOR = prepare_cpu_env()

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "export", "Predictor", "load_config", "build_model", "list_models",
           "__version__"]


def __getattr__(name):
    if name == "load_config":
        from .config import load_config
        return load_config
    if name in ("train", "evaluate", "export"):
        from . import api
        return getattr(api, name)
    if name == "Predictor":
        from .predictor import Predictor
        return Predictor
    if name in ("build_model", "list_models"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'ppcls_ft' has no attribute {name!r}")
