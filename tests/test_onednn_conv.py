"""The dense convolution on oneDNN (ppcls_ft/kernels/onednn_conv.cc): values and gradients against
Paddle's convolution, the layers that take it, and what happens without oneDNN's headers."""
import json
import logging
import shutil
import warnings

import numpy as np
import paddle
import pytest

from conftest import output_and_grads
from ppcls_ft import kernels
from ppcls_ft.kernels import onednn_headers
from ppcls_ft.models import build_model
from ppcls_ft.models import layers
from ppcls_ft.models.layers import Conv2D

F = paddle.nn.functional
LIBDNNL = kernels._paddle_libs() / "libdnnl.so.3"


@pytest.fixture
def conv(cpu_kernels):
    try:
        onednn_headers.find()
    except RuntimeError as exc:
        pytest.skip(f"oneDNN's headers are not installed ({exc}): Paddle's convolution serves")
    assert cpu_kernels.conv2d is not None, kernels._STATE["errors"]
    return cpu_kernels.conv2d


# (n, in, out, h, w, kernel [kh, kw], strides, paddings [top, bottom, left, right])
CASES = [
    (2, 3, 8, 33, 30, [7, 7], [2, 2], [3, 3, 3, 3]),  # ResNet's stem, odd sizes
    (2, 16, 16, 9, 9, [3, 3], [1, 1], [1, 1, 1, 1]),
    (2, 16, 32, 11, 10, [3, 3], [2, 2], [1, 1, 1, 1]),
    (3, 32, 16, 7, 7, [1, 1], [1, 1], [0, 0, 0, 0]),  # bottleneck 1x1
    (2, 16, 32, 9, 9, [1, 1], [2, 2], [0, 0, 0, 0]),  # downsample shortcut
    (1, 5, 7, 8, 6, [3, 2], [2, 1], [0, 1, 1, 0]),  # rectangular kernel and stride, uneven padding
    (2, 24, 20, 5, 5, [5, 5], [1, 1], [2, 2, 2, 2]),
]


NHWC, NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("n,cin,cout,h,w,k,strides,pads", CASES)
def test_values_and_gradients_equal_paddles_convolution(conv, n, cin, cout, h, w, k, strides, pads,
                                                        layout):
    rng = np.random.default_rng(cin * 31 + cout + h)
    xn = rng.standard_normal([n, cin, h, w]).astype(np.float32)
    wn = rng.standard_normal([cout, cin, *k]).astype(np.float32)
    oh = (h + pads[0] + pads[1] - k[0]) // strides[0] + 1
    ow = (w + pads[2] + pads[3] - k[1]) // strides[1] + 1
    gn = rng.standard_normal([n, cout, oh, ow]).astype(np.float32)
    # Paddle's four-number padding is [top, bottom, left, right], the operator's order
    ref = output_and_grads(lambda x, wt: F.conv2d(x, wt, stride=strides, padding=pads), [xn, wn], gn)
    last = layout == "NHWC"

    def ours_in_nchw():
        if not last:
            return output_and_grads(lambda x, wt: conv(x, wt, strides, pads), [xn, wn], gn)
        # the same convolution on the NHWC copies, its output and input gradient back in NCHW
        y, dx, dw = output_and_grads(lambda x, wt: conv(x, wt, strides, pads, True),
                                     [xn.transpose(NHWC), wn], gn.transpose(NHWC))
        assert y.shape == (n, oh, ow, cout) and dx.shape == (n, h, w, cin)
        return [y.transpose(NCHW), dx.transpose(NCHW), dw]

    ours = ours_in_nchw()
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ref, ours):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(a).max()), err_msg=name)
    # a second call with the same shape reuses the cached primitives and gives the same floats
    for a, b in zip(ours, ours_in_nchw()):
        np.testing.assert_array_equal(a, b)


def test_the_layer_takes_the_operator_only_for_its_case():
    def pads(*args, **kw):
        return Conv2D(*args, **kw)._pads

    assert pads(4, 8, 3, padding=1, bias_attr=False) == [1, 1, 1, 1]
    assert pads(4, 8, 1, stride=2, bias_attr=False) == [0, 0, 0, 0]  # a strided shortcut
    assert pads(4, 8, 1, bias_attr=False) is None  # pointwise: one GEMM in Paddle's, faster
    assert pads(4, 8, 3, padding=[1, 2], bias_attr=False) == [1, 1, 2, 2]
    assert pads(4, 8, 3, padding=[0, 1, 2, 3], bias_attr=False) == [0, 1, 2, 3]
    assert pads(4, 8, 3, padding=[[0, 0], [0, 0], [1, 0], [0, 1]], bias_attr=False) == [1, 0, 0, 1]
    assert pads(4, 8, 3, padding=1) is None  # a bias: the operator adds none
    assert pads(4, 8, 3, padding="SAME", bias_attr=False) is None
    assert pads(4, 8, 3, dilation=2, bias_attr=False) is None
    assert pads(4, 8, 3, groups=2, bias_attr=False) is None
    assert pads(4, 8, 3, padding=1, padding_mode="reflect", bias_attr=False) is None
    depthwise = Conv2D(8, 8, 3, padding=1, groups=8, bias_attr=False)
    assert depthwise._depthwise and depthwise._pads is None
    # NHWC: every dense case, pointwise too (no reorder around it there); depthwise is Paddle's
    assert pads(4, 8, 3, padding=1, data_format="NHWC", bias_attr=False) == [1, 1, 1, 1]
    assert pads(4, 8, 1, data_format="NHWC", bias_attr=False) == [0, 0, 0, 0]
    assert pads(4, 8, 3, padding=[[0, 0], [1, 0], [0, 1], [0, 0]], data_format="NHWC",
                bias_attr=False) == [1, 0, 0, 1]  # Paddle's pair form names NHWC's axes
    assert pads(4, 8, 3, padding=1, data_format="NHWC") is None
    depthwise = Conv2D(8, 8, 3, padding=1, groups=8, bias_attr=False, data_format="NHWC")
    assert not depthwise._depthwise and depthwise._pads is None


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_a_resnet_step_matches_float64_and_every_dense_convolution_takes_the_operator(
        conv, tmp_path, data_format, monkeypatch):
    """ResNet18 in train mode, one step on ppcls_ft's kernels: the logits within 1e-4 of the
    largest and every parameter gradient within 1e-4 of the largest, against the same step in
    float64 (Paddle's kernels). Built NHWC (``Arch.data_format``), the 1x1 stride-1 projection
    takes the operator too and the batch norms run their NHWC kernel.

    Every ReLU input is kept at least 1e-3 from zero (batch-norm scale 0.2, shift 1; asserted
    below). With the default scale 1 and shift 0, one ReLU input of the 4 x 3 x 3 x 256 at
    ``blocks.5.conv0`` lay within float32 rounding of zero: any float32 implementation could
    decide it either way (Paddle's own, NCHW and NHWC, did one way; the float64 step the other),
    and that one decision moved the gradients below it by 1e-2 of the largest, whatever the
    kernels."""
    paddle.seed(0)
    model = build_model({"name": "ResNet18", "class_num": 4, "data_format": data_format},
                        load_weights=False)
    model.train()
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer.weight.set_value(paddle.full_like(layer.weight, 0.2))
            layer.bias.set_value(paddle.full_like(layer.bias, 1.0))
    xn = np.random.default_rng(1).standard_normal([4, 3, 48, 48])
    y = paddle.to_tensor(np.arange(4))
    calls = []

    def counting(*args):
        calls.append(args[2:])
        return conv(*args)

    def step(dtype):
        logits = model(paddle.to_tensor(xn.astype(dtype)))
        F.cross_entropy(logits, y).backward()
        grads = {k: p.grad.numpy().astype(np.float64) for k, p in model.named_parameters()
                 if p.grad is not None}
        model.clear_gradients()
        return logits.numpy().astype(np.float64), grads

    saved = kernels._STATE["ops"]
    kernels._STATE["ops"] = type(saved)(**{**vars(saved), "conv2d": counting})
    try:
        logits, ours = step("float32")
    finally:
        kernels._STATE["ops"] = saved
    convs = [m for m in model.sublayers() if isinstance(m, paddle.nn.Conv2D)]
    dense = [m for m in convs if m._groups == 1 and (data_format == "NHWC" or (
        list(m._kernel_size), list(m._stride)) != ([1, 1], [1, 1]))]
    # ResNet18: stem, 16 in the blocks, 3 strided shortcuts; the 4th shortcut, 1x1 stride 1, is
    # Paddle's on NCHW
    assert len(convs) == 21
    assert len(calls) == len(dense) == (21 if data_format == "NHWC" else 20)
    assert all(c[-1] == (data_format == "NHWC") for c in calls)  # the layout reached the operator
    model.to(dtype="float64")  # same weights (no optimizer step); train-mode batch norm uses batch statistics
    # in float64 the batch norms take Paddle's path, then the activation from ACTIVATIONS; the
    # blocks end in an nn.ReLU
    margins = []

    def relu_recording(x):
        margins.append(float(x.abs().min()))
        return F.relu(x)

    monkeypatch.setitem(layers.ACTIVATIONS, "relu", relu_recording)
    hooks = [layer.register_forward_pre_hook(
                 lambda _, inputs: margins.append(float(inputs[0].abs().min())) and None)
             for layer in model.sublayers() if isinstance(layer, paddle.nn.ReLU)]
    ref_logits, ref = step("float64")
    monkeypatch.undo()
    for hook in hooks:
        hook.remove()
    assert len(margins) == 17 and min(margins) > 1e-3  # stem + 8 conv0 + 8 block outputs
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max())
    assert ref.keys() == ours.keys()
    scale = max(np.abs(g).max() for g in ref.values())
    for key in ref:
        assert np.abs(ours[key] - ref[key]).max() <= 1e-4 * scale, key
    model.to(dtype="float32")

    from ppcls_ft.engine.export import export_dygraph
    rng = paddle.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_dygraph(model, tmp_path, [3, 32, 32], [{"ToCHWImage": None}], export_onnx=False)
    after = paddle.rand([4]).numpy()
    paddle.set_rng_state(rng)
    assert np.array_equal(after, paddle.rand([4]).numpy())  # an export mid-training draws nothing
    graph = (out / "inference.json").read_text()
    assert "ppcls_conv2d" not in graph and "conv2d" in graph  # a static graph is Paddle's
    # an NHWC model exports as its NCHW twin (ResNet.for_export): paddle-inference's oneDNN
    # rejected the NHWC graph's stem convolution; the certificate compares against this model
    assert "NHWC" not in graph
    assert json.loads((out / "export_certificate.json").read_text())["passed"]
    # paddle.jit saw no branch of Conv2D.forward that binds a name (it warned once per layer)
    assert not [w for w in caught if "unbound" in str(w.message) or "ifelse" in str(w.message)]


def _headers_copy(tmp_path):
    include = tmp_path / "include"
    shutil.copytree(onednn_headers.find() / "oneapi", include / "oneapi")
    return include


def test_the_staged_headers_state_the_runtimes_of_paddles_library(conv, tmp_path):
    flags = onednn_headers.stage(tmp_path / "build", LIBDNNL)
    config = (tmp_path / "build" / "include" / "oneapi" / "dnnl" / "dnnl_config.h").read_text()
    *_, cpu, gpu = onednn_headers.library_version(LIBDNNL)
    assert (cpu, gpu) == (2, 0)  # Paddle 3.3's CPU wheel: the OpenMP build, no GPU runtime
    assert "#define DNNL_CPU_THREADING_RUNTIME DNNL_RUNTIME_OMP" in config
    assert "#define DNNL_CPU_RUNTIME DNNL_RUNTIME_OMP" in config
    assert "#define DNNL_GPU_RUNTIME DNNL_RUNTIME_NONE" in config
    assert "#define DNNL_WITH_SYCL" not in config
    # onednn_conv.cc refuses to compile without this mark, so every test above that ran the
    # operator also proves the build took the staged dnnl_config.h over the environment's own
    assert "#define PPCLS_FT_STAGED_DNNL_CONFIG 1" in config
    assert flags == [f"-iquote{tmp_path / 'build' / 'include'}"]


def test_the_cache_key_follows_every_header_byte(conv, tmp_path, monkeypatch):
    include = _headers_copy(tmp_path)
    monkeypatch.setenv("PPCLS_FT_ONEDNN_INCLUDE", str(include))
    before = onednn_headers.fingerprint(LIBDNNL)
    header = include / "oneapi" / "dnnl" / "dnnl_types.h"
    header.write_text(header.read_text() + "\n// one more line\n")
    after = onednn_headers.fingerprint(LIBDNNL)
    assert before != after
    assert kernels.build_dir(kernels.ONEDNN, before) != kernels.build_dir(kernels.ONEDNN, after)


def test_only_the_gradients_that_are_needed_are_computed_and_they_are_right(conv):
    rng = np.random.default_rng(5)
    xn = rng.standard_normal([2, 6, 9, 9]).astype(np.float32)
    wn = rng.standard_normal([4, 6, 3, 3]).astype(np.float32)
    gn = rng.standard_normal([2, 4, 9, 9]).astype(np.float32)
    _, ref_dx, ref_dw = output_and_grads(lambda x, wt: F.conv2d(x, wt, padding=1), [xn, wn], gn)
    for x_grad, w_grad in ((False, True), (True, False)):
        x = paddle.to_tensor(xn, stop_gradient=not x_grad)
        w = paddle.to_tensor(wn, stop_gradient=not w_grad)
        conv(x, w, [1, 1], [1, 1, 1, 1]).backward(paddle.to_tensor(gn))
        if x_grad:
            assert w.grad is None
            np.testing.assert_allclose(x.grad.numpy(), ref_dx, rtol=1e-5, atol=1e-4 * np.abs(ref_dx).max())
        else:
            assert x.grad is None
            np.testing.assert_allclose(w.grad.numpy(), ref_dw, rtol=1e-5, atol=1e-4 * np.abs(ref_dw).max())


def test_bad_attributes_and_empty_batches(conv):
    x = paddle.to_tensor(np.ones([1, 3, 5, 5], np.float32))
    w = paddle.to_tensor(np.ones([2, 3, 3, 3], np.float32))
    with pytest.raises(Exception, match="strides must be positive"):  # not a division by zero
        conv(x, w, [0, 1], [0, 0, 0, 0])
    with pytest.raises(Exception, match="paddings must be >= 0"):
        conv(x, w, [1, 1], [-1, 0, 0, 0])
    layer = Conv2D(3, 2, 3, padding=1, bias_attr=False)
    assert layer(paddle.zeros([0, 3, 5, 5])).shape == [0, 2, 5, 5]  # Paddle's convolution serves


def test_headers_of_another_release_are_refused_by_name(conv, tmp_path, monkeypatch):
    include = _headers_copy(tmp_path)
    version = include / "oneapi" / "dnnl" / "dnnl_version.h"
    version.write_text(version.read_text().replace("#define DNNL_VERSION_MINOR 6", "#define DNNL_VERSION_MINOR 2"))
    monkeypatch.setenv("PPCLS_FT_ONEDNN_INCLUDE", str(include))
    with pytest.raises(RuntimeError, match=r"release 3\.2\.\d+, Paddle's library is 3\.6\.\d+.*onednn-devel"):
        onednn_headers.fingerprint(LIBDNNL)


def test_without_the_headers_the_other_kernels_stay_and_convolution_is_paddles(conv, tmp_path,
                                                                              monkeypatch, caplog):
    monkeypatch.setenv("PPCLS_FT_ONEDNN_INCLUDE", str(tmp_path / "empty"))
    monkeypatch.setattr(kernels, "_STATE", {"tried": False, "ops": None, "errors": {}})
    with caplog.at_level(logging.WARNING, logger="ppcls_ft"):
        built = kernels.ops()
    assert built.conv2d is None and built.dwconv is not None and built.batch_norm is not None
    assert "ppcls_ft_onednn_conv unavailable" in caplog.text
    assert "pip install --no-deps onednn-devel==2025.0.1" in caplog.text
    assert "stock ppcls_ft_onednn_conv" in kernels.status() and "depthwise conv" in kernels.status()
    layer = Conv2D(3, 4, 3, padding=1, bias_attr=False)
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal([1, 3, 6, 6]).astype(np.float32))
    np.testing.assert_array_equal(layer(x).numpy(), F.conv2d(x, layer.weight, padding=1).numpy())


def test_a_failed_core_build_leaves_the_onednn_convolution(conv, monkeypatch):
    real = kernels._build

    def core_fails(lib):
        if lib is kernels.CORE:
            raise RuntimeError("cc1plus: internal compiler error")
        return real(lib)

    monkeypatch.setattr(kernels, "_build", core_fails)
    monkeypatch.setattr(kernels, "_STATE", {"tried": False, "ops": None, "errors": {}})
    built = kernels.ops()
    assert built.dwconv is None and built.conv2d is not None
    assert "internal compiler error" in kernels._STATE["errors"]["ppcls_ft_cpu_kernels"]
