"""Every real PaddleClas config in ../shared and every recipe in configs/ loads and builds unchanged,
with only dataset paths (and ``Arch.class_num``) overridden: model, loss, optimizer, LR schedule,
loaders, metrics. Multi-label configs are refused with one clear ``ConfigError``."""
import time
from pathlib import Path

import pytest

from conftest import shared_dir
from ppcls_ft.config import load_config, read_yaml
from ppcls_ft.engine.builder import build_train_parts
from ppcls_ft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PADDLECLAS_26 = shared_dir() / "paddleclas_configs" / "paddleclas-2.6"


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


# ---------------------------------------------------------------- PaddleClas 2.6, every file

def paddleclas26_configs():
    """Every YAML under paddleclas-2.6/ (79 files), or one ``None`` that skips when absent."""
    found = sorted(PADDLECLAS_26.rglob("*.yaml")) if PADDLECLAS_26.is_dir() else []
    return found or [None]


def _id(path):
    return "absent" if path is None else str(path.relative_to(PADDLECLAS_26).with_suffix(""))


def expected_multilabel(path):
    """Decided from where PaddleClas files the config, not from its content: the attribute
    and multi-label folders (Attr/, MultiLabelCOCO/, PULC/*_attribute/)."""
    parts = path.relative_to(PADDLECLAS_26).parts
    return parts[0] in ("Attr", "MultiLabelCOCO") or (parts[0] == "PULC" and parts[1].endswith("_attribute"))


# Keys that make a config multi-label; the refusal must name one of them.
MULTILABEL_KEYS = ("Global.use_multilabel", "MLDecoder", "DataLoader.Train.dataset.name",
                   "Loss.Train.0.MultiLabelLoss", "Loss.Train.0.MultiLabelAsymmetricLoss")


def _lists_for(root, train_list):
    """The tiny dataset as the three list layouts PaddleClas configs read."""
    lines = train_list.read_text().splitlines()
    tab = root / "train_list_tab.txt"
    tab.write_text("".join(line.replace(" ", "\t", 1) + "\n" for line in lines))
    paths = root / "samples.txt"  # CustomLabelDataset: paths only, the label comes from a transform
    paths.write_text("".join(line.split(" ")[0] + "\n" for line in lines))
    return {" ": train_list, "\t": tab, "paths": paths}


def _dataset_overrides(raw, lists, root):
    out = []
    for mode in ("Train", "Eval"):
        section = (raw.get("DataLoader") or {}).get(mode)
        if not section:
            continue
        dataset = section.get("dataset") or {}
        prefix = f"DataLoader.{mode}.dataset"
        if dataset.get("name") == "CustomLabelDataset":
            out.append(f"{prefix}.sample_list_path={lists['paths']}")
        else:
            delimiter = dataset.get("delimiter") or " "
            out.append(f"{prefix}.cls_label_path={lists[delimiter]}")
        out += [f"{prefix}.image_root={root}", f"DataLoader.{mode}.loader.num_workers=0"]
    return out


@pytest.mark.parametrize("cfg_path", paddleclas26_configs(), ids=_id)
def test_paddleclas26_config_builds_or_refuses_multilabel(cfg_path, tiny_dataset, tmp_path):
    if cfg_path is None:
        pytest.skip(f"PaddleClas 2.6 configs not found at {PADDLECLAS_26} (set PPCLS_FT_SHARED)")
    root, train_list, _ = tiny_dataset
    raw = read_yaml(cfg_path)
    # 4 classes: the tiny set has 3, image_orientation's RandomRot90 makes 4 labels.
    # pretrained False: no downloads; the build, not a forward pass, is what is checked.
    overrides = _dataset_overrides(raw, _lists_for(root, train_list), root) + [
        f"Global.output_dir={tmp_path / 'out'}", "Global.device=cpu", "Arch.class_num=4",
        "Arch.pretrained=False"]
    if expected_multilabel(cfg_path):
        with pytest.raises(ConfigError) as err:
            build_train_parts(load_config(cfg_path, overrides))
        message = str(err.value)
        assert "multi-label" in message and "\n" not in message, message
        assert err.value.path in MULTILABEL_KEYS, message
        return
    start = time.perf_counter()
    parts = build_train_parts(load_config(cfg_path, overrides))
    built = time.perf_counter() - start
    assert parts.model.class_num == 4
    images, labels, _ = next(iter(parts.train_loader))
    assert images.shape[0] > 0 and labels.shape[0] == images.shape[0]
    assert 0 <= int(labels.numpy().max()) < 4
    assert parts.steps_per_epoch >= 1 and parts.optimizer.get_lr() >= 0
    assert parts.train_loss is not None and parts.lr_scheduler is not None
    if parts.eval_loader is not None:
        assert next(iter(parts.eval_loader))[0].shape[0] > 0
    print(f"{_id(cfg_path)}: built in {built:.1f}s")
