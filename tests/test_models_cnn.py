"""CNN families (ResNet, PPLCNet, MobileNetV2): PaddleClas parity, real checkpoints, head contract,
lr_mult_list freezing and argument validation."""
import numpy as np
import paddle
import pytest

from parity_utils import (assert_logits_close, deterministic_state, keys_json, model_signature,
                          parity_input)
from ppcls_ft.errors import ConfigError
from ppcls_ft.models import mobilenet_v2, pp_lcnet, resnet
from ppcls_ft.registry import MODELS

try:
    from ppcls_ft.utils.safe_pickle import load_pdparams
except ImportError:  # safe_pickle not there yet: paddle's own reader gives the same dict
    def load_pdparams(path):
        return {k: np.asarray(v) for k, v in paddle.load(str(path), return_numpy=True).items()}

FAMILY_MODULES = {m.__name__ for m in (resnet, pp_lcnet, mobilenet_v2)}
CNN_NAMES = [n for n in MODELS.names() if MODELS.get(n).__module__ in FAMILY_MODULES]
PARITY_NAMES = ["ResNet18", "ResNet50", "ResNet50_vd", "PPLCNet_x0_25", "PPLCNet_x1_0", "MobileNetV2"]


def _eval_logits(model, x):
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def test_registry_has_every_paddleclas_name():
    expected = ([f"ResNet{d}{v}" for d in (18, 34, 50, 101, 152) for v in ("", "_vd")]
                + [f"PPLCNet_x{s}" for s in ("0_25", "0_35", "0_5", "0_75", "1_0", "1_5", "2_0", "2_5")]
                + ["MobileNetV2"] + [f"MobileNetV2_x{s}" for s in ("0_25", "0_5", "0_75", "1_5", "2_0")])
    assert sorted(expected) == sorted(CNN_NAMES)


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_parity_with_paddleclas(shared, name):
    model = MODELS.build(name, {}, "Arch", class_num=1000)
    assert model_signature(model) == keys_json(shared / "parity" / f"{name}.keys.json")
    model.set_state_dict(deterministic_state(model))
    ref = np.load(shared / "parity" / f"{name}.logits.npy")
    assert_logits_close(_eval_logits(model, parity_input(224)), ref)


REAL_CHECKPOINTS = [
    ("MobileNetV2_imagenet", "MobileNetV2", {"class_num": 1000}, (224, 224)),
    ("PPLCNet_x1_0_text_image_orientation", "PPLCNet_x1_0", {"class_num": 4}, (224, 224)),
    ("PPLCNet_x0_25_textline_orientation", "PPLCNet_x0_25",
     {"class_num": 2, "use_last_conv": False, "stride_list": [[1, 2], [2, 1], [2, 1], [2, 1], [2, 1]]},
     (80, 160)),
]


@pytest.mark.parametrize("stem, name, kwargs, hw", REAL_CHECKPOINTS, ids=[c[0] for c in REAL_CHECKPOINTS])
def test_real_checkpoint_reproduces_reference(shared, stem, name, kwargs, hw):
    kwargs = dict(kwargs)
    class_num = kwargs.pop("class_num")
    model = MODELS.build(name, kwargs, "Arch", class_num=class_num)
    state = load_pdparams(shared / "weights" / f"{stem}.pdparams")
    ours = model.state_dict()
    assert set(state) == set(ours)
    for k, v in state.items():
        assert list(v.shape) == list(ours[k].shape), k
    model.set_state_dict(state)
    ref = np.load(shared / "parity" / f"{stem}.logits.npy")
    assert_logits_close(_eval_logits(model, parity_input(*hw)), ref)


def test_stride_list_does_not_leak_into_later_models():
    # PaddleClas writes stride_list into a module-global table; a later default model must not see it.
    MODELS.build("PPLCNet_x0_25", {"stride_list": [[1, 2], [2, 1], [2, 1], [2, 1], [2, 1]]}, "Arch",
                 class_num=2)
    default = MODELS.build("PPLCNet_x0_25", {}, "Arch", class_num=2)
    assert list(default.blocks3[0].dw_conv.conv._stride) == [2, 2]


@pytest.mark.parametrize("name", CNN_NAMES)
def test_build_forward_backward_reset(name):
    paddle.seed(0)
    model = MODELS.build(name, {}, "Arch", class_num=3)
    model.train()
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype("float32"))
    out = model(x)
    assert out.shape == [2, 3]
    feat = model.forward_features(x)
    assert feat.ndim == 2 and feat.shape[0] == 2
    out.sum().backward()
    params = dict(model.named_parameters())
    stem_key = next(iter(params))
    assert params[stem_key].grad is not None and float(params[stem_key].grad.abs().sum()) > 0

    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    model.reset_classifier(5)
    after = model.state_dict()
    assert model.class_num == 5 and model.eval()(x).shape == [2, 5]
    assert set(after) == set(before)
    changed = {k for k in after if after[k].shape != list(before[k].shape)
               or not np.array_equal(after[k].numpy(), before[k])}
    head = {k for k in after if model.is_classifier_key(k)}
    assert head and changed == head


@pytest.mark.parametrize("name", ["ResNet18_vd", "PPLCNet_x0_25", "MobileNetV2_x0_25"])
def test_layer_ids_run_from_stem_to_head(name):
    model = MODELS.build(name, {}, "Arch", class_num=3)
    ids = [model.layer_id(k) for k, _ in model.named_parameters()]
    assert ids == sorted(ids), "layer ids must not decrease from input to output"
    assert ids[0] == 0 and ids[-1] == model.num_layer_ids - 1
    assert len(set(ids)) == model.num_layer_ids
    head_ids = {model.layer_id(k) for k, _ in model.named_parameters() if model.is_classifier_key(k)}
    assert head_ids == {model.num_layer_ids - 1}


# (name, lr_mult_list with one 0, state_dict prefix of the frozen stage, prefix of a trained stage)
FREEZE_CASES = [
    ("ResNet18_vd", [1.0, 0.0, 1.0, 1.0, 1.0], "blocks.0.", "blocks.2."),
    ("ResNet18", [0.0, 1.0, 1.0, 1.0, 1.0], "stem.", "blocks.0."),
    ("PPLCNet_x0_25", [1.0, 1.0, 1.0, 0.0, 1.0, 1.0], "blocks4.", "blocks5."),
    ("MobileNetV2_x0_25", [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "conv3.", "conv4."),
]


@pytest.mark.parametrize("name, mults, frozen, trained", FREEZE_CASES, ids=[c[0] for c in FREEZE_CASES])
def test_zero_lr_mult_freezes_that_stage(name, mults, frozen, trained):
    paddle.seed(0)
    model = MODELS.build(name, {"lr_mult_list": mults}, "Arch", class_num=3)
    model.train()
    # batch-norm running stats are non-trainable parameters in Paddle; only trainable ones step
    params = {k: p for k, p in model.named_parameters() if not p.stop_gradient}
    assert any(k.startswith(frozen) for k in params) and any(k.startswith(trained) for k in params)
    before = {k: p.numpy().copy() for k, p in params.items()}
    opt = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9, parameters=model.parameters())
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype("float32"))
    loss = paddle.nn.functional.cross_entropy(model(x), paddle.to_tensor([0, 1]))
    loss.backward()
    opt.step()
    for k, p in params.items():
        moved = not np.array_equal(p.numpy(), before[k])
        if k.startswith(frozen):
            assert p.optimize_attr["learning_rate"] == 0.0, k
            assert not moved, f"{k} changed although its lr multiplier is 0"
    assert any(not np.array_equal(p.numpy(), before[k]) for k, p in params.items()
               if k.startswith(trained))


@pytest.mark.parametrize("name, bad", [("ResNet50", [1.0] * 4), ("ResNet50_vd", [1.0] * 6),
                                       ("PPLCNet_x1_0", [1.0] * 5), ("MobileNetV2", [1.0] * 5)])
def test_bad_lr_mult_list_length_is_a_config_error(name, bad):
    with pytest.raises(ConfigError) as err:
        MODELS.build(name, {"lr_mult_list": bad}, "Arch", class_num=3)
    assert err.value.path == "Arch.lr_mult_list"


@pytest.mark.parametrize("name, kwargs, path", [
    ("ResNet18", {"stride_list": [2, 2, 2]}, "Arch.stride_list"),
    ("PPLCNet_x0_25", {"stride_list": [2, 2, 2, 2, [1, 2, 3]]}, "Arch.stride_list.4"),
    ("ResNet18", {"lr_mult_list": [1.0, -1.0, 1.0, 1.0, 1.0]}, "Arch.lr_mult_list.1"),
    ("ResNet18", {"data_format": "NCWH"}, "Arch.data_format"),
    ("PPLCNet_x0_25", {"dropout_prob": 1.0}, "Arch.dropout_prob"),
])
def test_bad_arguments_name_their_config_path(name, kwargs, path):
    with pytest.raises(ConfigError) as err:
        MODELS.build(name, kwargs, "Arch", class_num=3)
    assert err.value.path == path


def test_bad_class_num_is_a_config_error():
    with pytest.raises(ConfigError, match="Arch.class_num"):
        MODELS.build("ResNet18", {}, "Arch", class_num=0)


def test_resnet_nhwc_matches_nchw():
    x = parity_input(64)
    nchw = MODELS.build("ResNet18_vd", {}, "Arch", class_num=10)
    nhwc = MODELS.build("ResNet18_vd", {"data_format": "NHWC"}, "Arch", class_num=10)
    state = deterministic_state(nchw)
    nchw.set_state_dict(state)
    nhwc.set_state_dict(state)
    assert_logits_close(_eval_logits(nhwc, x), _eval_logits(nchw, x))


def test_resnet_vd_stage_stride_one_and_no_max_pool():
    # PaddleClas pools every vd shortcut by 2 and crashes when a stage keeps its resolution.
    model = MODELS.build("ResNet18_vd", {"stride_list": [2, 2, 2, 2, 1], "max_pool": False},
                         "Arch", class_num=3)
    model.eval()
    x = paddle.to_tensor(parity_input(64))
    feat = model.blocks(model.stem(x))
    # stem /2, no max-pool, stages 2-3 /2 each, stage 4 stride 1: 64 -> 32 -> 8
    assert feat.shape == [2, 512, 8, 8]
    assert model(x).shape == [2, 3]


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    from ppcls_ft.models.layers import DropPath

    paddle.seed(0)
    layer = DropPath(0.25)
    x = paddle.ones([4000, 3, 2])
    y = layer(x).numpy()
    per_sample = y.reshape(4000, -1)
    # each sample is either all zero or all 1 / (1 - p)
    values = np.unique(per_sample)
    assert np.all(np.isclose(values, 0.0) | np.isclose(values, 1 / 0.75))
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert abs(float(y.mean()) - 1.0) < 0.05
    layer.eval()
    assert np.array_equal(layer(x).numpy(), x.numpy())


def test_resnet18_dbb_keys_follow_paddleclas_and_it_trains():
    """ResNet18_dbb.yaml: layer_type DiverseBranchBlock, use_first_short_conv False."""
    model = MODELS.build("ResNet18", {"class_num": 3, "layer_type": "DiverseBranchBlock",
                                      "use_first_short_conv": False})
    keys = set(model.state_dict())
    for suffix in ("dbb_origin.conv.weight", "dbb_origin.bn._variance", "dbb_1x1.conv.weight",
                   "dbb_avg.conv.weight", "dbb_avg.bn.bn._mean", "dbb_avg.avgbn.weight",
                   "dbb_1x1_kxk.idconv1.weight", "dbb_1x1_kxk.bn1.bn.bias",
                   "dbb_1x1_kxk.conv2.weight", "dbb_1x1_kxk.bn2._mean"):
        assert f"blocks.0.conv0.{suffix}" in keys and f"blocks.7.conv1.{suffix}" in keys
    assert not any(k.startswith("blocks.0.short") for k in keys)  # identity first shortcut
    assert "blocks.2.short.conv.weight" in keys and "stem.0.conv.weight" in keys
    assert not any("id_tensor" in k for k in keys)
    x = paddle.randn([2, 3, 32, 32])
    model.train()
    out = model(x)
    assert out.shape == [2, 3]
    out.mean().backward()
    assert model.blocks[0].conv0.dbb_1x1_kxk.idconv1.weight.grad is not None


def test_dbb_padded_bn_equals_bn_of_a_padded_input():
    """The padding value is BN(0), so BN-then-pad equals pad-then-BN (what makes DBB foldable)."""
    from ppcls_ft.models.dbb import _BNAndPad
    layer = _BNAndPad(4, pad=1, lr_mult=1.0)
    rng = np.random.default_rng(0)
    for name in ("weight", "bias", "_mean"):
        getattr(layer.bn, name).set_value(rng.normal(size=4).astype("float32"))
    layer.bn._variance.set_value(rng.uniform(0.5, 2.0, 4).astype("float32"))
    layer.eval()
    x = paddle.to_tensor(rng.normal(size=(2, 4, 5, 6)).astype("float32"))
    want = layer.bn(paddle.nn.functional.pad(x, [1, 1, 1, 1]))
    np.testing.assert_allclose(layer(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_dbb_branch_starts_as_identity_and_bad_layer_type_is_a_config_error():
    from ppcls_ft.models.dbb import _IdentityConv1x1
    conv = _IdentityConv1x1(3, 1.0)
    x = paddle.randn([1, 3, 4, 4])
    np.testing.assert_allclose(conv(x).numpy(), x.numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="Arch.layer_type"):
        MODELS.build("ResNet18", {"layer_type": "DBB"})
    with pytest.raises(ConfigError, match="Arch.use_first_short_conv"):
        MODELS.build("ResNet50", {"use_first_short_conv": False})
