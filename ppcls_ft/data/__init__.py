"""Data pipeline: per-image transforms, datasets, samplers, batch operators, the loader builder.

Importing this package registers every transform, dataset, sampler and batch operator.
``augment.py`` (AutoAugment, RandAugment, RandomErasing, ...) is optional while it is being
written: only its absence is tolerated, an error inside it is raised.
"""
import importlib

from . import transforms  # noqa: F401  (registers TRANSFORMS)

try:  # registers TimmAutoAugment, RandomErasing, ...
    importlib.import_module(f"{__name__}.augment")
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.augment":
        raise

from .batch_ops import CutmixOperator, MixupOperator, OpSampler, build_batch_op  # noqa: E402
from .dataset import (CustomLabelDataset, ImageFolderDataset, ImageNetDataset,  # noqa: E402
                      collate_skip_none)
from .loader import build_dataloader, set_epoch  # noqa: E402
from .samplers import ClassBalancedSampler, DistributedBatchSampler  # noqa: E402
from .transforms import Compose, build_transforms  # noqa: E402

__all__ = [
    "build_transforms", "Compose", "ImageNetDataset", "ImageFolderDataset", "CustomLabelDataset",
    "collate_skip_none",
    "DistributedBatchSampler", "ClassBalancedSampler", "MixupOperator", "CutmixOperator",
    "OpSampler", "build_batch_op", "build_dataloader", "set_epoch",
]
