"""Tests for the weight path: safe .pdparams reading, key/shape-checked loading, build_model, URLs."""
import builtins
import os
import pickle

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from ppcls_ft.errors import ConfigError, WeightsError
from ppcls_ft.models._builder import LoadReport, build_model, list_models, load_pretrained
from ppcls_ft.models._urls import OFFICIAL_URLS, has_official_weights, official_url
from ppcls_ft.models.base import ClassifierBase
from ppcls_ft.registry import MODELS
from ppcls_ft.utils.safe_pickle import STRUCTURED_NAME_KEY, load_pdparams


class TinyNet(ClassifierBase):
    """conv-bn-pool-fc: enough keys (weights, bias, BN stats) to exercise the loader."""

    classifier_prefixes = ("fc.",)

    def __init__(self, class_num: int = 3, width: int = 4):
        super().__init__()
        self.class_num = class_num
        self.conv = nn.Conv2D(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2D(width)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(width, class_num)

    def forward_features(self, x):
        return paddle.flatten(self.pool(nn.functional.relu(self.bn(self.conv(x)))), 1)

    def forward_head(self, x):
        return self.fc(x)

    def reset_classifier(self, class_num):
        self.class_num = class_num
        self.fc = nn.Linear(self.fc.weight.shape[0], class_num)


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _save_tiny(tmp_path, name="tiny", **kwargs):
    paddle.seed(1)
    model = TinyNet(**kwargs)
    path = tmp_path / f"{name}.pdparams"
    paddle.save(model.state_dict(), str(path))
    return model, path


def _pickle_dict(path, state):
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=2)
    return path


quiet = dict(logger=None)


# ---- safe_pickle -----------------------------------------------------------------------------

def test_paddle_save_round_trip(tmp_path):
    model, path = _save_tiny(tmp_path)
    loaded = load_pdparams(path)
    assert STRUCTURED_NAME_KEY not in loaded
    assert list(loaded) == list(model.state_dict())
    for key, value in _state(model).items():
        np.testing.assert_array_equal(loaded[key], value)


def test_paddle_save_of_tensor_dict_unwraps_name_tuple(tmp_path):
    path = tmp_path / "t.pdparams"
    paddle.save({"w": paddle.arange(6, dtype="float32").reshape([2, 3])}, str(path))
    loaded = load_pdparams(path)
    np.testing.assert_array_equal(loaded["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_rejected_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
    else:
        payload = _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    path = _pickle_dict(tmp_path / "evil.pdparams", {"fc.weight": np.zeros(2, np.float32), "x": payload})
    with pytest.raises(WeightsError) as err:
        load_pdparams(path)
    assert "forbidden global" in str(err.value) and str(path) in str(err.value)
    assert kind.split(".")[1] in str(err.value)
    assert not marker.exists()


def test_truncated_or_non_pickle_file_raises(tmp_path):
    _, path = _save_tiny(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_pdparams(path)
    (tmp_path / "text.pdparams").write_text("not a pickle")
    with pytest.raises(WeightsError):
        load_pdparams(tmp_path / "text.pdparams")


def test_non_array_entries_and_object_arrays_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="'epoch'"):
        load_pdparams(_pickle_dict(tmp_path / "a.pdparams", {"w": np.ones(2), "epoch": 3}))
    objects = np.array([1, "x"], dtype=object)
    with pytest.raises(WeightsError, match="object array"):
        load_pdparams(_pickle_dict(tmp_path / "b.pdparams", {"w": objects}))


def test_split_big_param_is_reassembled(tmp_path):
    full = np.arange(10, dtype=np.float32).reshape(2, 5)
    state = {"w@@.0": full.ravel()[:6], "w@@.1": full.ravel()[6:],
             "UnpackBigParamInfor@@": {"w": {"OriginShape": (2, 5), "slices": ["w@@.0", "w@@.1"]}}}
    loaded = load_pdparams(_pickle_dict(tmp_path / "big.pdparams", state))
    assert list(loaded) == ["w"]
    np.testing.assert_array_equal(loaded["w"], full)


def test_shared_weights_load_under_numpy2(shared):
    files = sorted((shared / "weights").glob("*.pdparams"))
    assert len(files) == 3
    for path in files:
        state = load_pdparams(path)
        assert len(state) > 100
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())


# ---- load_pretrained on the tiny model ------------------------------------------------------

def test_exact_load_copies_every_tensor(tmp_path):
    src, path = _save_tiny(tmp_path)
    paddle.seed(2)
    dst = TinyNet()
    report = load_pretrained(dst, str(path), **quiet)
    assert report.loaded == report.total == len(src.state_dict())
    assert report.head_reinitialised is None and report.complete
    for key, value in _state(src).items():
        np.testing.assert_array_equal(dst.state_dict()[key].numpy(), value)


def test_suffix_optional_and_missing_file_lists_tried_paths(tmp_path):
    _, path = _save_tiny(tmp_path, name="best_model")
    report = load_pretrained(TinyNet(), str(tmp_path / "best_model"), **quiet)
    assert report.path == str(path)
    with pytest.raises(WeightsError) as err:
        load_pretrained(TinyNet(), str(tmp_path / "nope"), **quiet)
    assert str(tmp_path / "nope.pdparams") in str(err.value) and str(tmp_path / "nope") in str(err.value)


def test_class_count_change_reinitialises_exactly_the_head(tmp_path):
    src, path = _save_tiny(tmp_path, class_num=3)
    dst = TinyNet(class_num=5)
    lines = []
    report = load_pretrained(dst, path, logger=lines.append)
    assert report.head_reinitialised == 5
    assert report.head_keys == ["fc.weight", "fc.bias"]
    assert report.loaded == report.total - 2 and report.complete
    assert "head re-initialised for 5 classes (fc.weight, fc.bias)" in lines[0]
    assert list(dst.fc.weight.shape) == [4, 5]
    for key, value in _state(src).items():
        if not key.startswith("fc."):
            np.testing.assert_array_equal(dst.state_dict()[key].numpy(), value)
    dst.eval()
    assert dst(paddle.rand([1, 3, 8, 8])).shape == [1, 5]


def test_missing_backbone_key_raises_unless_not_strict(tmp_path):
    src, _ = _save_tiny(tmp_path)
    state = _state(src)
    del state["conv.weight"]
    path = _pickle_dict(tmp_path / "partial.pdparams", state)
    with pytest.raises(WeightsError) as err:
        load_pretrained(TinyNet(), path, **quiet)
    assert "1 missing keys: conv.weight" in str(err.value) and str(path) in str(err.value)
    dst = TinyNet()
    before = dst.conv.weight.numpy().copy()
    report = load_pretrained(dst, path, strict=False, **quiet)
    assert report.missing == ["conv.weight"] and not report.complete
    assert report.loaded == report.total - 1
    np.testing.assert_array_equal(dst.conv.weight.numpy(), before)
    np.testing.assert_array_equal(dst.bn._mean.numpy(), state["bn._mean"])
    assert "1 missing" in str(report)


def test_unexpected_and_wrong_shaped_backbone_keys_raise(tmp_path):
    src, _ = _save_tiny(tmp_path, width=6)
    state = _state(src)
    state["extra.weight"] = np.ones(3, np.float32)
    path = _pickle_dict(tmp_path / "wide.pdparams", state)
    with pytest.raises(WeightsError) as err:
        load_pretrained(TinyNet(width=4), path, **quiet)
    msg = str(err.value)
    assert "unexpected keys: extra.weight" in msg
    assert "wrong-shaped" in msg and "conv.weight file [6, 3, 3, 3] vs model [4, 3, 3, 3]" in msg
    report = load_pretrained(TinyNet(width=4), path, strict=False, **quiet)
    assert report.unexpected == ["extra.weight"]
    assert {m[0] for m in report.mismatched} == {"conv.weight", "conv.bias", "bn.weight", "bn.bias",
                                                 "bn._mean", "bn._variance"}
    assert report.head_reinitialised == 3  # fc in-features changed too: the head is reset, not mixed


def test_dtype_is_cast_and_legacy_attn_mask_ignored(tmp_path):
    src, _ = _save_tiny(tmp_path)
    state = {k: v.astype(np.float64) for k, v in _state(src).items()}
    state["layers.0.blocks.1.attn_mask"] = np.zeros((4, 49, 49), np.float32)
    path = _pickle_dict(tmp_path / "f64.pdparams", state)
    dst = TinyNet()
    report = load_pretrained(dst, path, **quiet)
    assert report.ignored == ["layers.0.blocks.1.attn_mask"] and report.complete
    assert dst.conv.weight.dtype == paddle.float32
    np.testing.assert_allclose(dst.conv.weight.numpy(), state["conv.weight"], rtol=1e-6)


def test_report_str_is_one_paragraph():
    report = LoadReport(path="w.pdparams", loaded=318, total=320, head_reinitialised=5,
                        head_keys=["fc.weight", "fc.bias"], ignored=["a.attn_mask"])
    text = str(report)
    assert text.startswith("loaded 318/320 tensors from w.pdparams; head re-initialised for 5 classes")
    assert "a.attn_mask" in text and "\n" not in text


# ---- build_model ----------------------------------------------------------------------------

@pytest.fixture
def tiny_registered(monkeypatch):
    """TinyNet in MODELS for one test only (restored afterwards, so registry-wide tests never see it)."""
    monkeypatch.setitem(MODELS._table, "TinyNet", TinyNet)
    return "TinyNet"


def test_build_model_strips_name_and_loads_path(tmp_path, tiny_registered):
    src, path = _save_tiny(tmp_path, class_num=3)
    model = build_model({"name": "TinyNet ", "class_num": 7, "pretrained": str(path)[:-len(".pdparams")]})
    assert model.class_num == 7 and list(model.fc.weight.shape) == [4, 7]
    np.testing.assert_array_equal(model.conv.weight.numpy(), src.conv.weight.numpy())


def test_build_model_config_errors_name_the_key(tmp_path, tiny_registered):
    with pytest.raises(ConfigError, match=r"Arch\.clas_num.*class_num"):
        build_model({"name": "TinyNet", "clas_num": 3})
    with pytest.raises(ConfigError, match=r"Arch\.use_ssld"):
        build_model({"name": "TinyNet", "pretrained": str(tmp_path / "x"), "use_ssld": True})
    with pytest.raises(ConfigError, match=r"Arch\.pretrained.*no official weights for 'TinyNet'"):
        build_model({"name": "TinyNet", "pretrained": True})
    with pytest.raises(ConfigError, match=r"Arch\.pretrained:"):
        build_model({"name": "TinyNet", "pretrained": 3})
    with pytest.raises(ConfigError, match=r"Arch\.name"):
        build_model({"name": "TinyNett"})
    _, path = _save_tiny(tmp_path, width=6)
    with pytest.raises(WeightsError):
        build_model({"name": "TinyNet", "pretrained": str(path)})
    model = build_model({"name": "TinyNet", "pretrained": str(path), "load_strict": False})
    assert model.class_num == 3


# ---- official URLs ----------------------------------------------------------------------------

def test_official_urls_follow_paddleclas_layout():
    root = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/"
    assert official_url("ResNet50") == root + "legendary_models/ResNet50_pretrained.pdparams"
    assert official_url("ResNet50_vd", use_ssld=True) == (
        root + "legendary_models/ResNet50_vd_ssld_pretrained.pdparams")
    assert official_url("PPLCNet_x1_0", use_ssld=True).endswith(
        "legendary_models/PPLCNet_x1_0_ssld_pretrained.pdparams")
    assert official_url("MobileNetV2") == root + "MobileNetV2_pretrained.pdparams"
    assert official_url(" MobileNetV2", use_ssld=True) == root + "MobileNetV2_ssld_pretrained.pdparams"
    assert official_url("SwinTransformer_base_patch4_window7_224", variant="22kto1k").endswith(
        "legendary_models/SwinTransformer_base_patch4_window7_224_22kto1k_pretrained.pdparams")
    assert "22kto1k" in official_url("SwinTransformer_large_patch4_window7_224")


@pytest.mark.parametrize("name, kwargs, key", [
    ("ResNet50", {"use_ssld": True}, "Arch.use_ssld"),
    ("PPLCNet_x0_25", {"use_ssld": True}, "Arch.use_ssld"),
    ("SwinTransformer_tiny_patch4_window7_224", {"variant": "22kto1k"}, "Arch.pretrained_variant"),
    ("ResNet50", {"variant": "22k"}, "Arch.pretrained_variant"),
    ("NoSuchNet", {}, "Arch.pretrained"),
])
def test_unknown_official_combination_lists_what_exists(name, kwargs, key):
    with pytest.raises(ConfigError) as err:
        official_url(name, **kwargs)
    assert err.value.path == key
    if name in OFFICIAL_URLS:
        assert "available for" in str(err.value) or "choose null" in str(err.value)


def test_every_registered_model_has_official_weights():
    names = list_models()
    assert names, "no model registered"
    assert [n for n in names if not has_official_weights(n)] == []


# ---- real checkpoints (../shared/weights) --------------------------------------------------

TEXTLINE_ARGS = {"class_num": 2, "use_last_conv": False,
                 "stride_list": [[1, 2], [2, 1], [2, 1], [2, 1], [2, 1]]}


def _real(shared, stem):
    return shared / "weights" / f"{stem}.pdparams"


@pytest.mark.parametrize("stem, name, kwargs, hw", [
    ("MobileNetV2_imagenet", "MobileNetV2", {"class_num": 1000}, (224, 224)),
    ("PPLCNet_x1_0_text_image_orientation", "PPLCNet_x1_0", {"class_num": 4}, (224, 224)),
    ("PPLCNet_x0_25_textline_orientation", "PPLCNet_x0_25", TEXTLINE_ARGS, (80, 160)),
])
def test_real_checkpoint_loads_strictly_and_matches_reference(shared, stem, name, kwargs, hw):
    model = MODELS.build(name, dict(kwargs), "Arch")
    report = load_pretrained(model, str(_real(shared, stem))[:-len(".pdparams")], **quiet)
    assert report.complete and report.loaded == report.total
    assert report.head_reinitialised is None and report.ignored == []
    ref = np.load(shared / "parity" / f"{stem}.logits.npy")
    x = np.random.default_rng(0).standard_normal((2, 3) + hw).astype("float32")
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor(x)).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_real_pplcnet_into_seven_classes_resets_only_fc(shared):
    path = _real(shared, "PPLCNet_x1_0_text_image_orientation")
    model = MODELS.build("PPLCNet_x1_0", {"class_num": 7}, "Arch")
    report = load_pretrained(model, path, **quiet)
    assert report.head_reinitialised == 7
    assert sorted(report.head_keys) == ["fc.bias", "fc.weight"]
    assert report.loaded == report.total - 2 and report.complete
    assert "head re-initialised for 7 classes" in str(report)
    file_state = load_pdparams(path)
    own = model.state_dict()
    assert list(own["fc.weight"].shape) == [1280, 7]
    for key in ("conv1.conv.weight", "last_conv.weight"):
        np.testing.assert_array_equal(own[key].numpy(), file_state[key])


def test_real_pplcnet_into_mobilenetv2_lists_missing_keys(shared):
    path = _real(shared, "PPLCNet_x1_0_text_image_orientation")
    model = MODELS.build("MobileNetV2", {"class_num": 4}, "Arch")
    with pytest.raises(WeightsError) as err:
        load_pretrained(model, path, **quiet)
    msg = str(err.value)
    assert str(path) in msg and "missing keys: conv1._conv.weight" in msg and "unexpected keys" in msg
    assert "(+" in msg  # long lists are cut to the first few with a count


def test_real_partial_load_reports_missing_last_conv(shared):
    path = _real(shared, "PPLCNet_x0_25_textline_orientation")
    model = MODELS.build("PPLCNet_x0_25", {"class_num": 2}, "Arch")  # use_last_conv=True: no file weights
    with pytest.raises(WeightsError, match="last_conv.weight"):
        load_pretrained(model, path, **quiet)
    report = load_pretrained(model, path, strict=False, **quiet)
    assert report.missing == ["last_conv.weight"]
    assert report.head_reinitialised == 2  # fc in-features 128 (file) vs 1280 (model)
    assert report.loaded == report.total - 3
    assert "1 missing (left at init): last_conv.weight" in str(report)


def test_paddleclas_swin_22kto1k_key_selects_the_variant(monkeypatch):
    from ppcls_ft.models import _builder
    seen = {}

    def fake_load(model, source, **kw):
        seen.update(kw, source=source)

    monkeypatch.setattr(_builder, "load_pretrained", fake_load)
    _builder.build_model({"name": "SwinTransformer_base_patch4_window7_224", "class_num": 3,
                          "img_size": 64, "window_size": 2, "pretrained": True,
                          "use_imagenet22kto1k_pretrained": True})
    assert seen["source"] is True and seen["variant"] == "22kto1k"
    assert "22kto1k" in _builder.official_url("SwinTransformer_base_patch4_window7_224", variant="22kto1k")


def test_use_ssld_without_weights_is_accepted_and_logged(tiny_registered, caplog):
    """PULC configs set use_ssld: True; run with -o Arch.pretrained=False they must still build
    (PaddleClas ignores use_ssld then), and the log says the key did nothing. use_sync_bn is
    left for the engine, never passed to the constructor."""
    import logging
    from ppcls_ft import config as C
    C._warned.discard("Arch.use_ssld")
    logger = logging.getLogger("ppcls_ft")
    logger.addHandler(caplog.handler)
    try:
        model = build_model({"name": "TinyNet", "class_num": 3, "pretrained": False,
                             "use_ssld": True, "use_sync_bn": True}, load_weights=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert model.class_num == 3
    assert "Arch.use_ssld" in caplog.text and "no effect" in caplog.text
