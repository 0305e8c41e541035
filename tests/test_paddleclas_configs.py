"""Every real PaddleClas config in ../shared and every recipe in configs/ loads and builds unchanged,
with only dataset paths overridden (model, loss, optimizer, LR schedule, loaders, metrics)."""
from pathlib import Path

import pytest

from ppcls_ft.config import load_config
from ppcls_ft.engine.builder import build_train_parts

REPO = Path(__file__).resolve().parents[1]


def _data_overrides(cfg_path, data_root, train_list):
    cfg = load_config(cfg_path)
    out = []
    for mode in ("Train", "Eval"):
        if mode in (cfg.get("DataLoader") or {}):
            out += [f"DataLoader.{mode}.dataset.image_root={data_root}",
                    f"DataLoader.{mode}.dataset.cls_label_path={train_list}",
                    f"DataLoader.{mode}.loader.num_workers=0"]
    return out


def _build(cfg_path, tiny_dataset, tmp_path, extra=()):
    root, train_list, _ = tiny_dataset
    overrides = _data_overrides(cfg_path, root, train_list) + [
        f"Global.output_dir={tmp_path / 'out'}", "Global.device=cpu", "Arch.class_num=3",
        "Arch.pretrained=False", *extra]
    cfg = load_config(cfg_path, overrides)
    parts = build_train_parts(cfg)
    images, labels, _ = next(iter(parts.train_loader))
    assert images.shape[0] > 0 and labels.shape[0] == images.shape[0]
    assert parts.optimizer.get_lr() >= 0
    return cfg, parts


def shared_configs():
    from conftest import shared_dir
    folder = shared_dir() / "paddleclas_configs"
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


@pytest.mark.parametrize("cfg_path", shared_configs(), ids=lambda p: p.stem)
def test_shared_paddleclas_config_builds(cfg_path, tiny_dataset, tmp_path, shared):
    # Swin at 224 is slow on CPU; the build (not a forward pass) is what is checked here.
    cfg, parts = _build(cfg_path, tiny_dataset, tmp_path)
    assert parts.model.class_num == 3
    assert parts.steps_per_epoch >= 1


@pytest.mark.parametrize("cfg_path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipe_builds(cfg_path, tiny_dataset, tmp_path):
    cfg, parts = _build(cfg_path, tiny_dataset, tmp_path)
    assert parts.model.class_num == 3
