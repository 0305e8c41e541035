"""SwinTransformer family: PaddleClas parity (keys and logits), every variant trains, head reset,
layer ids, and the weight surgery of ``adapt_state_dict`` (window 7 -> 12, legacy attn_mask)."""
import numpy as np
import paddle
import pytest

from parity_utils import assert_logits_close, deterministic_state, keys_json, model_signature, parity_input
from ppcls_ft.errors import ConfigError
from ppcls_ft.models import swin_transformer as swin
from ppcls_ft.registry import MODELS

TINY = "SwinTransformer_tiny_patch4_window7_224"
BASE = "SwinTransformer_base_patch4_window7_224"
VARIANTS = [TINY, "SwinTransformer_small_patch4_window7_224", BASE,
            "SwinTransformer_large_patch4_window7_224", "SwinTransformer_base_patch4_window12_384",
            "SwinTransformer_large_patch4_window12_384"]
# (fixture stem, registered name, img_size); the three shared parity references
PARITY = [(TINY, TINY, 224), (BASE, BASE, 224), (f"{TINY}@448", TINY, 448)]


def build(name, class_num=1000, **arch):
    return MODELS.build(name, arch, "Arch", class_num=class_num)


def run(model, x):
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


@pytest.fixture(scope="module")
def parity_models():
    """Each parity model built once per module, with the deterministic weights, in eval mode."""
    cache = {}

    def get(name, size):
        if (name, size) not in cache:
            model = build(name, img_size=size)
            model.set_state_dict(deterministic_state(model))
            model.eval()
            cache[(name, size)] = model
        return cache[(name, size)]
    return get


@pytest.fixture(scope="module")
def tiny64():
    paddle.seed(0)
    model = build(TINY, class_num=3, img_size=64)
    model.eval()
    return model


@pytest.mark.parametrize("stem,name,size", PARITY)
def test_state_dict_matches_paddleclas(shared, parity_models, stem, name, size):
    ref = keys_json(shared / "parity" / f"{stem}.keys.json")
    ours = model_signature(parity_models(name, size))
    assert set(ours) == set(ref), f"missing {set(ref) - set(ours)}, extra {set(ours) - set(ref)}"
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, f"shape/dtype differ: {wrong}"
    assert not any(k.endswith("attn_mask") for k in ours)


@pytest.mark.parametrize("stem,name,size", PARITY)
def test_logits_match_paddleclas(shared, parity_models, stem, name, size):
    ref = np.load(shared / "parity" / f"{stem}.logits.npy")
    assert_logits_close(run(parity_models(name, size), parity_input(size)), ref)


def test_small_stage_uses_clipped_window_without_shift(parity_models):
    """Original Swin rule: at 224 stage 4 is 7x7 = the window, so its odd block is not shifted;
    at 448 it is 14x14 and shifts by 3."""
    at224, at448 = parity_models(TINY, 224), parity_models(TINY, 448)
    assert [b.shift for b in at224.layers[3].blocks] == [0, 0]
    assert [b.shift for b in at448.layers[3].blocks] == [0, 3]
    assert at224.layers[3].blocks[1].attn_mask is None


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_builds_and_trains(name):
    """img_size 64: stage maps 16, 8, 4, 2 - exercises padding (16 is no multiple of 7 or 12)
    and clipped windows at the small stages."""
    paddle.seed(0)
    model = build(name, class_num=3, img_size=64)
    model.train()
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype("float32"))
    logits = model(x)
    assert logits.shape == [2, 3]
    logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(("head.", "patch_embed."))]
    assert all(g is not None and bool(paddle.isfinite(g).all()) for g in grads)
    assert float(paddle.abs(model.patch_embed.proj.weight.grad).sum()) > 0
    window = model.window_size
    # the window clips to the map where the map is no larger than it
    assert [layer.blocks[0].window for layer in model.layers] == [min(window, r) for r in (16, 8, 4, 2)]


def test_runs_at_other_input_size_than_built(tiny64):
    """Shift masks for another padded size are computed on the fly (dygraph)."""
    x = np.random.default_rng(2).standard_normal((1, 3, 96, 96)).astype("float32")
    out = run(tiny64, x)
    assert out.shape == (1, 3) and np.isfinite(out).all()


def test_reset_classifier_changes_only_head():
    model = build(TINY, class_num=3, img_size=64)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    model.reset_classifier(5)
    after = model.state_dict()
    assert model.class_num == 5 and list(after["head.weight"].shape) == [768, 5]
    assert list(after["head.bias"].shape) == [5]
    for key, value in before.items():
        if not key.startswith("head."):
            np.testing.assert_array_equal(after[key].numpy(), value, err_msg=key)
    x = np.zeros((1, 3, 64, 64), "float32")
    assert run(model.eval(), x).shape == (1, 5)
    assert model.is_classifier_key("head.weight") and not model.is_classifier_key("norm.weight")


def test_layer_ids_follow_depth(tiny64):
    depths = tiny64.depths  # (2, 2, 6, 2)
    assert tiny64.num_layer_ids == sum(depths) + 2
    assert tiny64.layer_id("patch_embed.proj.weight") == 0
    assert tiny64.layer_id("layers.0.blocks.0.attn.qkv.weight") == 1
    assert tiny64.layer_id("layers.0.blocks.1.norm1.bias") == 2
    assert tiny64.layer_id("layers.0.downsample.reduction.weight") == 2  # with the block before
    assert tiny64.layer_id("layers.1.blocks.0.mlp.fc1.weight") == 3
    assert tiny64.layer_id("layers.3.blocks.1.mlp.fc2.bias") == sum(depths)
    assert tiny64.layer_id("norm.weight") == tiny64.layer_id("head.bias") == sum(depths) + 1
    ids = [tiny64.layer_id(n) for n, _ in tiny64.named_parameters()]
    assert ids == sorted(ids), "layer ids must not decrease in depth order"


def test_window7_checkpoint_loads_into_window12_model(parity_models):
    src = deterministic_state(parity_models(TINY, 224))
    # img 192 with window 12: stage maps 48, 24, 12, 6 -> tables 23x23, 23x23, 23x23 (clipped 12), 11x11
    target = build(TINY, class_num=1000, img_size=192, window_size=12)
    adapted = target.adapt_state_dict(src)
    own = target.state_dict()
    assert set(adapted) == set(own)
    for key, value in own.items():
        assert list(np.shape(adapted[key])) == list(value.shape), key
    assert np.shape(adapted["layers.0.blocks.0.attn.relative_position_bias_table"]) == (23 * 23, 3)
    assert np.shape(adapted["layers.3.blocks.1.attn.relative_position_bias_table"]) == (11 * 11, 24)
    idx = "layers.3.blocks.0.attn.relative_position_index"
    np.testing.assert_array_equal(adapted[idx], own[idx].numpy())
    np.testing.assert_array_equal(adapted["head.weight"], src["head.weight"])  # untouched
    target.set_state_dict(adapted)
    target.eval()
    out = run(target, parity_input(192))
    assert out.shape == (2, 1000) and np.isfinite(out).all()


def test_bias_table_resize_keeps_structure():
    table = np.random.default_rng(3).standard_normal((13 * 13, 2)).astype("float32")
    np.testing.assert_allclose(swin.resize_bias_table(table, 7), table, atol=1e-5)  # same size
    const = np.full((13 * 13, 2), 0.5, "float32")
    np.testing.assert_allclose(swin.resize_bias_table(const, 12), 0.5, atol=1e-5)
    bigger = swin.resize_bias_table(table, 12).reshape(23, 23, 2)
    # the grid's centre (relative offset 0,0) maps onto the new centre
    np.testing.assert_allclose(bigger[11, 11], table.reshape(13, 13, 2)[6, 6], atol=0.2)


def test_legacy_attn_mask_keys_are_dropped(tiny64):
    state = {k: v.numpy() for k, v in tiny64.state_dict().items()}
    legacy = dict(state)
    legacy["layers.0.blocks.1.attn_mask"] = np.zeros((9, 49, 49), "float32")
    legacy["layers.1.blocks.1.attn_mask"] = np.zeros((4, 49, 49), "float32")
    adapted = tiny64.adapt_state_dict(legacy)
    assert not any(k.endswith("attn_mask") for k in adapted)
    assert set(adapted) == set(state)
    assert "layers.0.blocks.1.attn_mask" in legacy  # the input is not modified
    x = np.random.default_rng(4).standard_normal((1, 3, 64, 64)).astype("float32")
    expected = run(tiny64, x)
    other = build(TINY, class_num=3, img_size=64)
    other.set_state_dict(adapted)
    np.testing.assert_allclose(run(other.eval(), x), expected, rtol=1e-5, atol=1e-5)


def test_missing_index_is_supplied(tiny64):
    state = {k: v.numpy() for k, v in tiny64.state_dict().items()
             if not k.endswith("relative_position_index")}
    adapted = tiny64.adapt_state_dict(state)
    assert set(adapted) == set(tiny64.state_dict())


def test_absolute_pos_embed_is_resized():
    small = build(TINY, class_num=3, img_size=64, ape=True)
    assert list(small.state_dict()["absolute_pos_embed"].shape) == [1, 16 * 16, 96]
    assert small.layer_id("absolute_pos_embed") == 0
    big = build(TINY, class_num=3, img_size=96, ape=True)
    adapted = big.adapt_state_dict({k: v.numpy() for k, v in small.state_dict().items()})
    assert np.shape(adapted["absolute_pos_embed"]) == (1, 24 * 24, 96)
    big.set_state_dict(adapted)
    assert np.isfinite(run(big.eval(), np.zeros((1, 3, 96, 96), "float32"))).all()


def test_shift_mask_and_index_geometry():
    w = 4
    mask = swin.shift_attn_mask(2 * w, 2 * w, w, w // 2)
    assert mask.shape == (4, w * w, w * w)
    assert (mask[0] == 0).all()  # top-left window holds one region only
    assert (mask[3] != 0).any() and (mask == mask.transpose(0, 2, 1)).all()
    idx = swin.relative_position_index(w)
    assert idx.dtype == np.int64 and idx.min() == 0 and idx.max() == (2 * w - 1) ** 2 - 1
    assert (np.diag(idx) == (w - 1) * (2 * w - 1) + (w - 1)).all()  # offset (0, 0) is the centre


@pytest.mark.parametrize("size", [100, 200, 0])
def test_img_size_must_be_multiple_of_32(size):
    with pytest.raises(ConfigError) as err:
        build(TINY, class_num=3, img_size=size)
    assert err.value.path == "Arch.img_size"


@pytest.mark.parametrize("key", ["use_fused_attn", "use_fused_linear"])
def test_fused_kernels_are_refused(key):
    with pytest.raises(ConfigError) as err:
        build(TINY, class_num=3, img_size=64, **{key: True})
    assert err.value.path == f"Arch.{key}" and "GPU" in str(err.value)


def test_real_paddleclas_arch_sections_validate(shared):
    yaml = pytest.importorskip("yaml")
    for name in (TINY, BASE):
        arch = yaml.safe_load((shared / "paddleclas_configs" / f"{name}.yaml").read_text())["Arch"]
        kwargs = {k: v for k, v in arch.items() if k not in ("name", "class_num", "pretrained")}
        assert kwargs.get("use_fused_attn") is False
        MODELS.check(arch["name"], kwargs, "Arch", skip=("class_num",))
    with pytest.raises(ConfigError) as err:
        MODELS.check(TINY, {"window_szie": 7}, "Arch")
    assert "window_size" in str(err.value)


def test_input_not_multiple_of_32_is_explained(tiny64):
    with pytest.raises(ValueError, match="multiples of 32"):
        run(tiny64, np.zeros((1, 3, 80, 64), "float32"))


def _train_step_values(model, x):
    model.clear_gradients()
    logits = model(x)
    (logits * paddle.arange(logits.shape[1], dtype="float32")).sum().backward()
    return logits.numpy(), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


def test_copying_transposes_change_no_value(monkeypatch):
    """setup_device turns Paddle's strided views off on the CPU (FLAGS_use_stride_kernel=0: a
    quarter of a Swin step was spent making views contiguous). Logits and every gradient of a
    training step are the same either way; the user's own flag is left alone."""
    from ppcls_ft.utils.device import copying_transposes

    monkeypatch.delenv("FLAGS_use_stride_kernel", raising=False)

    paddle.seed(0)
    model = build(TINY, class_num=3, img_size=64, drop_path_rate=0.0)
    model.train()
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype("float32"))
    saved = paddle.get_flags(["FLAGS_use_stride_kernel"])
    try:
        paddle.set_flags({"FLAGS_use_stride_kernel": True})
        views = _train_step_values(model, x)
        assert copying_transposes() is not None
        assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] is False
        copies = _train_step_values(model, x)
        monkeypatch.setenv("FLAGS_use_stride_kernel", "1")
        paddle.set_flags({"FLAGS_use_stride_kernel": True})
        assert copying_transposes() is None
        assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] is True
    finally:
        paddle.set_flags(saved)
    np.testing.assert_allclose(copies[0], views[0], rtol=1e-6, atol=1e-6)
    assert views[1].keys() == copies[1].keys() and len(views[1]) > 100
    scale = max(np.abs(g).max() for g in views[1].values())
    for key, grad in views[1].items():
        np.testing.assert_allclose(copies[1][key], grad, rtol=1e-5, atol=1e-6 * scale, err_msg=key)
