"""The LayerNorm, GELU, hardswish and batch-norm custom operators (ppcls_ft/kernels/norm_act.cc)
against Paddle's own, the broadcast add whose gradient is a matrix
product (models/layers.add_broadcast) against the plain add, and a Swin training step with all of
them against one without."""
import json

import numpy as np
import paddle
import pytest

from conftest import output_and_grads
from ppcls_ft import kernels
from ppcls_ft.models import build_model
from ppcls_ft.models.layers import GELU, BatchNorm2D, Hardswish, LayerNorm, Linear, add_broadcast

F = paddle.nn.functional


@pytest.fixture
def ops(cpu_kernels):
    return cpu_kernels


def _close(ours, ref, names):
    for name, a, b in zip(names, ref, ours):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(a).max()), err_msg=name)


@pytest.mark.parametrize("shape", [(2, 49, 96), (3, 5, 7), (4, 1536), (1, 1, 1), (6, 33)])
def test_layer_norm_equals_paddles(ops, shape):
    rng = np.random.default_rng(sum(shape))
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)  # an offset: the mean matters
    w, b = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(shape).astype(np.float32)
    ref = output_and_grads(lambda x, w, b: F.layer_norm(x, c, w, b, 1e-5), [x, w, b], g)
    ours = output_and_grads(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), [x, w, b], g)
    _close(ours, ref, ("output", "input gradient", "scale gradient", "shift gradient"))


@pytest.mark.parametrize("scale", [0.5, 4.0, 30.0])
def test_gelu_equals_paddles_exact_gelu(ops, scale):
    """Small, typical and saturated inputs (the tails: 0 and x), an odd length for the loop tail."""
    rng = np.random.default_rng(int(scale))
    x = (rng.standard_normal((3, 8193)) * scale).astype(np.float32)
    x[0, :5] = [0.0, -0.0, 1e-30, -90.0, 90.0]
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref = output_and_grads(lambda x: F.gelu(x), [x], g)
    ours = output_and_grads(lambda x: ops.gelu(x), [x], g)
    _close(ours, ref, ("output", "input gradient"))
    assert np.isfinite(ours[0]).all() and np.isfinite(ours[1]).all()


def test_hardswish_equals_paddles_bit_for_bit(ops):
    """Paddle's arithmetic, so its values at the kinks (-3, 3), for infinities and NaN too."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((2, 8195)) * 4).astype(np.float32)
    x[0, :9] = [0.0, -0.0, -3.0, 3.0, 6.0, np.nan, np.inf, -np.inf, 2.9999998]
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref = output_and_grads(lambda x: F.hardswish(x), [x], g)
    ours = output_and_grads(lambda x: ops.hardswish(x), [x], g)
    for name, a, b in zip(("output", "input gradient"), ref, ours):
        np.testing.assert_array_equal(b, a, err_msg=name)
    hs = Hardswish()
    np.testing.assert_array_equal(hs(paddle.to_tensor(x)).numpy(), ref[0])


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 16, 28, 28), (2, 3, 1, 1)])
def test_batch_norm_layer_equals_paddles_in_training_and_after(ops, shape):
    """Two training steps (values, gradients, running statistics), then eval mode: the same as
    nn.BatchNorm2D with the same parameters."""
    rng = np.random.default_rng(shape[1])
    c = shape[1]
    plain, ours = paddle.nn.BatchNorm2D(c, momentum=0.8), BatchNorm2D(c, momentum=0.8)
    state = {k: paddle.to_tensor(rng.standard_normal(v.shape).astype(np.float32) + (2 if "var" in k else 0))
             for k, v in plain.state_dict().items()}
    plain.set_state_dict(state)
    ours.set_state_dict(state)
    assert list(ours.state_dict()) == list(plain.state_dict())
    for step in range(2):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        results = []
        for layer in (plain, ours):
            layer.train()
            layer.clear_gradients()
            xt = paddle.to_tensor(x, stop_gradient=False)
            y = layer(xt)
            y.backward(paddle.to_tensor(g))
            results.append([y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy(),
                            layer._mean.numpy(), layer._variance.numpy()])
        _close(results[1], results[0], ("output", "input gradient", "scale gradient", "shift gradient",
                                        "running mean", "running variance"))
    plain.eval(), ours.eval()
    x = paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))
    np.testing.assert_allclose(ours(x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)  # eval


@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish"])
def test_batch_norm_with_a_fused_activation_equals_paddles_pair(ops, act):
    """BatchNorm2D(x, act) on the kernel (activation fused) against nn.BatchNorm2D followed by
    Paddle's activation: values, gradients and running statistics. The shift puts many outputs
    on each side of the kinks (0 and 6 for ReLU6, -3 and 3 for hardswish)."""
    rng = np.random.default_rng(len(act))
    shape, c = (4, 6, 9, 7), 6
    plain, ours = paddle.nn.BatchNorm2D(c), BatchNorm2D(c)
    state = {k: paddle.to_tensor(v.numpy()) for k, v in plain.state_dict().items()}
    state["weight"] = paddle.to_tensor(rng.uniform(2, 4, c).astype(np.float32))
    state["bias"] = paddle.to_tensor(rng.uniform(-2, 4, c).astype(np.float32))
    plain.set_state_dict(state)
    ours.set_state_dict(state)
    fn = {"relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish}[act]
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    results = []
    for forward in (lambda t: fn(plain(t)), lambda t: ours(t, act)):
        xt = paddle.to_tensor(x, stop_gradient=False)
        y = forward(xt)
        y.backward(paddle.to_tensor(g))
        layer = plain if not results else ours
        results.append([y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy(),
                        layer._mean.numpy(), layer._variance.numpy()])
    y_ref = results[0][0]
    if act == "relu6":
        assert (y_ref == 0).mean() > 0.05 and (y_ref == 6).mean() > 0.05  # both kinks are crossed
    else:
        assert (y_ref == 0).mean() > 0.05
    _close(results[1], results[0], ("output", "input gradient", "scale gradient", "shift gradient",
                                    "running mean", "running variance"))
    ours.eval(), plain.eval()
    xt = paddle.to_tensor(x)
    np.testing.assert_allclose(ours(xt, act).numpy(), fn(plain(xt)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("shape", [(4, 9, 7, 6), (3, 28, 28, 20), (2, 1, 1, 3)])
def test_batch_norm_on_nhwc_equals_paddles(ops, shape, act):
    """``data_format="NHWC"``: the kernel's channels-last path (per-thread column sums in blocks
    of rows; 3 * 28 * 28 rows is not a multiple of the block) against Paddle's NHWC batch norm
    and activation, over two training steps (values, gradients, running statistics), then in
    eval mode."""
    rng = np.random.default_rng(shape[-1] + len(act or ""))
    c = shape[-1]
    plain = paddle.nn.BatchNorm2D(c, momentum=0.8, data_format="NHWC")
    ours = BatchNorm2D(c, momentum=0.8, data_format="NHWC")
    state = {k: paddle.to_tensor(v.numpy()) for k, v in plain.state_dict().items()}
    state["weight"] = paddle.to_tensor(rng.uniform(0.5, 3, c).astype(np.float32))
    state["bias"] = paddle.to_tensor(rng.uniform(-1, 2, c).astype(np.float32))
    plain.set_state_dict(state)
    ours.set_state_dict(state)
    fn = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6}[act]
    calls = []
    real = ops.batch_norm

    def counting(*args):
        calls.append(args[-1])
        return real(*args)

    for step in range(2):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        results = []
        for forward, layer in ((lambda t: fn(plain(t)), plain), (lambda t: ours(t, act), ours)):
            layer.train()
            layer.clear_gradients()
            xt = paddle.to_tensor(x, stop_gradient=False)
            saved = kernels._STATE["ops"]
            kernels._STATE["ops"] = type(saved)(**{**vars(saved), "batch_norm": counting})
            try:
                y = forward(xt)
            finally:
                kernels._STATE["ops"] = saved
            y.backward(paddle.to_tensor(g))
            results.append([y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(),
                            layer.bias.grad.numpy(), layer._mean.numpy(), layer._variance.numpy()])
        _close(results[1], results[0], ("output", "input gradient", "scale gradient",
                                        "shift gradient", "running mean", "running variance"))
    assert calls == [True, True]  # our layer took the kernel, channels-last, in both steps
    plain.eval(), ours.eval()
    x = paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))
    np.testing.assert_allclose(ours(x, act).numpy(), fn(plain(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_batch_norm_on_nhwc_gives_the_same_floats_on_one_math_thread_and_two(ops):
    """The NHWC sums go over fixed blocks of rows, not per-thread shares, so a 2-process launch
    (one math thread each) and a 1-process run (two) normalise alike; forward and backward."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal([4, 30, 30, 24]) * 3 + 1).astype(np.float32)  # 3600 rows: 57 blocks
    g = rng.standard_normal(x.shape).astype(np.float32)
    scale = rng.uniform(0.5, 2, 24).astype(np.float32)
    shift = rng.uniform(-1, 1, 24).astype(np.float32)
    results = {}
    try:
        for threads in (1, 2):
            paddle.base.core.set_num_threads(threads)
            xt, st, bt = (paddle.to_tensor(a, stop_gradient=False) for a in (x, scale, shift))
            out, mean, var = ops.batch_norm(xt, st, bt, 1e-5, "relu", True)
            out.backward(paddle.to_tensor(g))
            results[threads] = [t.numpy() for t in (out, mean, var, xt.grad, st.grad, bt.grad)]
    finally:
        from ppcls_ft.utils.device import available_cores
        paddle.base.core.set_num_threads(available_cores())
    for name, a, b in zip(("output", "mean", "variance", "input gradient", "scale gradient",
                           "shift gradient"), results[1], results[2]):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_conv_bn_layers_hand_their_activation_to_the_batch_norm(ops):
    """ConvBNAct and MobileNetV2's ConvBNLayer call the batch-norm kernel with their activation
    (one kernel call, no activation operator after it); a bad name is refused."""
    from ppcls_ft.models.layers import ConvBNAct
    from ppcls_ft.models.mobilenet_v2 import ConvBNLayer
    seen = []

    class Spy:
        def __getattr__(self, name):
            op = getattr(ops, name)
            if name != "batch_norm":
                return op
            return lambda *args: seen.append(args[4]) or op(*args)

    images = paddle.to_tensor(np.random.default_rng(0).standard_normal([2, 3, 8, 8]).astype(np.float32))
    saved = dict(kernels._STATE)
    kernels._STATE.update(tried=True, ops=Spy())
    try:
        for act in ("relu", "hardswish", None):
            ConvBNAct(3, 4, 3, act=act)(images)
        layer = ConvBNLayer(3, 4, 3)
        layer(images), layer(images, if_act=False)
    finally:
        kernels._STATE.clear()
        kernels._STATE.update(saved)
    assert seen == ["relu", "hardswish", "", "relu6", ""]
    with pytest.raises(ValueError, match="act must be one of"):
        ConvBNAct(3, 4, 3, act="gelu")
    with pytest.raises(ValueError, match="act must be one of"):
        BatchNorm2D(3)(images, "swish")


def test_conv_bn_layers_with_another_batch_norm_apply_the_activation_after_it():
    """Arch.use_sync_bn replaces every batch norm with nn.SyncBatchNorm, whose forward takes the
    input only (and which has no CPU kernel): a layer whose bn is not ppcls_ft's BatchNorm2D
    calls it with the input alone and applies the activation after it. Here a plain
    nn.BatchNorm2D stands in for SyncBatchNorm."""
    from ppcls_ft.models.layers import ConvBNAct
    from ppcls_ft.models.mobilenet_v2 import ConvBNLayer
    images = paddle.to_tensor(np.random.default_rng(0).standard_normal([2, 3, 8, 8]).astype(np.float32))
    assert isinstance(paddle.nn.SyncBatchNorm.convert_sync_batchnorm(ConvBNAct(3, 4, 3)).bn,
                      paddle.nn.SyncBatchNorm)  # the premise: conversion swaps the class
    for layer, bn_name, act, fn in [(ConvBNAct(3, 4, 3, act="relu"), "bn", "relu", F.relu),
                                    (ConvBNAct(3, 4, 3, act="hardswish"), "bn", "hardswish", F.hardswish),
                                    (ConvBNLayer(3, 4, 3), "_batch_norm", "relu6", F.relu6)]:
        ours = getattr(layer, bn_name)
        expected = fn(ours(layer._conv(images) if bn_name == "_batch_norm" else layer.conv(images)))
        plain = paddle.nn.BatchNorm2D(4)
        plain.set_state_dict(ours.state_dict())
        setattr(layer, bn_name, plain)
        np.testing.assert_allclose(layer(images).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=act)


def test_layers_take_the_kernels_only_where_they_may(ops, tmp_path):
    """Dygraph float32 on the CPU: the custom operators; an exact GELU only; a LayerNorm without
    scale, or over two axes, is Paddle's; so is every static graph (an export)."""
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal([2, 3, 8]).astype(np.float32))
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    plain_ln, plain_gelu = paddle.nn.LayerNorm(8), paddle.nn.GELU()
    ln, gelu = LayerNorm(8), GELU()
    ln.set_state_dict(plain_ln.state_dict())
    saved = dict(kernels._STATE)
    kernels._STATE.update(tried=True, ops=Spy())
    try:
        np.testing.assert_allclose(ln(x).numpy(), plain_ln(x).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gelu(x).numpy(), plain_gelu(x).numpy(), rtol=1e-5, atol=1e-6)
        assert calls == ["layer_norm", "gelu"]
        GELU(approximate=True)(x), LayerNorm(8, weight_attr=False)(x), LayerNorm([3, 8])(x)
        assert calls == ["layer_norm", "gelu"]
        images = paddle.to_tensor(np.ones([2, 3, 4, 4], np.float32))
        bn = BatchNorm2D(3)
        bn(images)
        Hardswish()(x)
        assert calls == ["layer_norm", "gelu", "batch_norm", "hardswish"]
        bn.eval(), bn(images), BatchNorm2D(3, use_global_stats=True)(images)
        GELU()(x.astype("float64")), Hardswish()(x.astype("float64"))  # not float32: Paddle's
        assert calls == ["layer_norm", "gelu", "batch_norm", "hardswish"]
        BatchNorm2D(3, data_format="NHWC")(images.transpose([0, 2, 3, 1]))  # NHWC: the kernel
        assert calls == ["layer_norm", "gelu", "batch_norm", "hardswish", "batch_norm"]
    finally:
        kernels._STATE.clear()
        kernels._STATE.update(saved)
    assert [p.name.split("_")[0] for p in ln.parameters()] == ["layer", "layer"]  # names as nn's
    assert list(ln.state_dict()) == list(plain_ln.state_dict())

    from ppcls_ft.engine.export import export_dygraph
    model = build_model({"name": "SwinTransformer_tiny_patch4_window7_224", "class_num": 3,
                         "img_size": 64, "window_size": 2}, load_weights=False)
    out = export_dygraph(model, tmp_path, [3, 64, 64], [{"ToCHWImage": None}], export_onnx=False)
    graph = (out / "inference.json").read_text()
    assert "ppcls_" not in graph and "layer_norm" in graph and "gelu" in graph
    assert json.loads((out / "export_certificate.json").read_text())["passed"]


@pytest.mark.parametrize("x_shape,b_shape", [((4, 5, 6), (6,)), ((8, 3, 7, 7), (1, 3, 7, 7)),
                                             ((2, 4, 3, 5, 5), (4, 3, 5, 5))])
def test_broadcast_add_has_the_plain_adds_values_and_gradients(x_shape, b_shape):
    rng = np.random.default_rng(len(x_shape))
    xn, bn = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(b_shape).astype(np.float32)
    g = rng.standard_normal(x_shape).astype(np.float32)
    ref = output_and_grads(lambda x, b: x + b, [xn, bn], g)
    ours = output_and_grads(add_broadcast, [xn, bn], g)
    np.testing.assert_array_equal(ours[0], ref[0])  # x + 1 * b: the same floats
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_allclose(ours[2], ref[2], rtol=1e-5, atol=1e-5)
    x = paddle.to_tensor(xn)  # needs no gradient (a frozen input): only b's
    b = paddle.to_tensor(bn, stop_gradient=False)
    add_broadcast(x, b).backward(paddle.to_tensor(g))
    assert x.grad is None
    np.testing.assert_allclose(b.grad.numpy(), ref[2], rtol=1e-5, atol=1e-5)
    with paddle.no_grad():
        np.testing.assert_array_equal(add_broadcast(paddle.to_tensor(xn), b).numpy(), ref[0])
    x64, b64 = paddle.to_tensor(xn.astype(np.float64)), paddle.to_tensor(bn.astype(np.float64))
    b64.stop_gradient = False
    add_broadcast(x64, b64).backward(paddle.to_tensor(g.astype(np.float64)))  # plain add: same dtype
    assert b64.grad.dtype == paddle.float64
    np.testing.assert_allclose(b64.grad.numpy(), ref[2], rtol=1e-5, atol=1e-5)


def test_linear_keeps_nn_linears_names_and_values():
    plain, ours = paddle.nn.Linear(6, 4), Linear(6, 4)
    ours.set_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert [p.name.split("_")[0] for p in ours.parameters()] == ["linear", "linear"]
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal([3, 5, 6]).astype(np.float32))
    np.testing.assert_array_equal(ours(x).numpy(), plain(x).numpy())


def test_a_swin_training_step_is_the_same_with_every_speed_up(ops):
    """Logits and every parameter gradient of a Swin step with the custom operators and the
    broadcast add against Paddle's kernels and the plain add (same weights, no dropout)."""
    from ppcls_ft.models import layers

    paddle.seed(0)
    model = build_model({"name": "SwinTransformer_tiny_patch4_window7_224", "class_num": 4,
                         "img_size": 64, "drop_path_rate": 0.0}, load_weights=False)
    model.train()
    x = paddle.to_tensor(np.random.default_rng(5).standard_normal([2, 3, 64, 64]).astype(np.float32))
    y = paddle.to_tensor(np.arange(2))

    def step():
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        model.clear_gradients()
        return logits.numpy(), grads

    fast_logits, fast = step()
    real_add = layers.add_broadcast
    try:
        for module in (layers, __import__("ppcls_ft.models.swin_transformer", fromlist=["x"])):
            module.add_broadcast = lambda a, b: a + b
        with kernels.stock():
            ref_logits, ref = step()
    finally:
        for module in (layers, __import__("ppcls_ft.models.swin_transformer", fromlist=["x"])):
            module.add_broadcast = real_add
    np.testing.assert_allclose(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert fast.keys() == ref.keys() and len(ref) > 100
    scale = max(np.abs(g).max() for g in ref.values())
    for key in ref:
        assert np.abs(fast[key] - ref[key]).max() <= 1e-4 * scale, key
