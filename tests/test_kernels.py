"""ppcls_ft's CPU training kernels (ppcls_ft/kernels): the depthwise convolution custom operator
against Paddle's own kernel, inside the models, and its fallbacks."""
import json
import logging
from pathlib import Path

import numpy as np
import paddle
import pytest

from conftest import assert_mkl_took_avx2, output_and_grads
from ppcls_ft import kernels
from ppcls_ft.models import build_model
from ppcls_ft.models.layers import Conv2D

F = paddle.nn.functional


@pytest.fixture
def op(cpu_kernels):
    return cpu_kernels.dwconv


# p None: the models' (k - 1) // 2. The others: no padding, more padding than the kernel reaches
# (rows of zeros in the gradient's padded plane), and a stride past the kernel (input pixels that
# no output reads, whose gradient is 0).
@pytest.mark.parametrize("n,c,h,w,k,s,p", [(2, 3, 7, 7, 3, 1, None), (2, 4, 8, 8, 3, 2, None),
                                           (3, 5, 9, 11, 5, 2, None), (1, 2, 6, 5, 5, 1, None),
                                           (2, 3, 5, 5, 3, 2, None), (2, 6, 13, 10, 3, 2, None),
                                           (1, 3, 4, 4, 7, 1, None), (2, 2, 9, 9, 3, 3, None),
                                           (2, 3, 8, 9, 3, 2, 0), (1, 2, 6, 7, 3, 1, 3),
                                           (2, 2, 10, 7, 5, 2, 4), (2, 3, 8, 7, 1, 3, 0),
                                           (1, 2, 9, 8, 2, 3, 1), (4, 16, 14, 14, 5, 1, None)])
def test_values_and_gradients_equal_paddles_kernel(op, n, c, h, w, k, s, p):
    rng = np.random.default_rng(n * 100 + k * 10 + s)
    p = (k - 1) // 2 if p is None else p
    xn = rng.standard_normal([n, c, h, w]).astype(np.float32)
    wn = rng.standard_normal([c, 1, k, k]).astype(np.float32)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    gn = rng.standard_normal([n, c, oh, ow]).astype(np.float32)
    ref = output_and_grads(lambda x, wt: F.conv2d(x, wt, stride=s, padding=p, groups=c), [xn, wn], gn)
    ours = output_and_grads(lambda x, wt: op(x, wt, s, p), [xn, wn], gn)
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ref, ours):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(a).max()), err_msg=name)


_TRAIN_ALIKE = """
import json, os, sys
import numpy as np, paddle
import paddle.nn.functional as F
from ppcls_ft import _cpu, kernels
from ppcls_ft.models import build_model
from ppcls_ft.models.layers import Conv2D
assert kernels.depthwise_op() is not None, kernels._STATE["errors"]
# this compares the depthwise kernel: the dense convolutions stay Paddle's on both sides (oneDNN's
# sums differ from MKL's GEMM in the last bits, which ReLU6 kinks amplify; tests/test_onednn_conv.py)
kernels._STATE["ops"].conv2d = None
paddle.seed(0)
model = build_model({"name": sys.argv[1], "class_num": 4}, load_weights=False)
model.train()
x = paddle.to_tensor(np.random.default_rng(1).standard_normal([4, 3, 48, 48]).astype(np.float32))
y = paddle.to_tensor(np.arange(4))
fast = [m for m in model.sublayers() if isinstance(m, Conv2D) and m._depthwise]

def step():
    paddle.seed(7)  # PPLCNet's dropout draws the same mask both times
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return logits.numpy(), grads

with kernels.stock():
    ref_logits, ref = step()
logits, ours = step()
scale = max(np.abs(g).max() for g in ref.values())
print(json.dumps({"mkl": _cpu.mkl_path(), "debug_type": os.environ.get("MKL_DEBUG_CPU_TYPE"), "fast": len(fast), "same_keys": ref.keys() == ours.keys(),
                  "logits": float(np.abs(logits - ref_logits).max()),
                  "logits_scale": float(np.abs(ref_logits).max()),
                  "grads": {k: float(np.abs(ours[k] - ref[k]).max()) for k in ref}, "scale": float(scale)}))
"""


@pytest.mark.parametrize("name", ["MobileNetV2", "PPLCNet_x0_25"])
def test_models_train_alike_with_either_kernel(op, name):
    """Logits within 1e-4 of the largest (the batch-norm kernel sums in another order than
    Paddle's), every parameter gradient within 1e-4 of the largest, one model.

    Run on MKL's AVX2 path (PPCLS_FT_MKL=avx2, a child process): there Paddle's im2col GEMM sums
    a depthwise tap in the kernel's order. On MKL's AVX-512 path the two differ in the last bit,
    and a random-weight network in train mode turns that into gradient differences of up to 8 %
    (ReLU6 kinks flip), which says nothing about the kernel."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "MKL_ENABLE_INSTRUCTIONS")}
    env.update(PPCLS_FT_MKL="avx2", PYTHONPATH=str(Path(kernels.__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", _TRAIN_ALIKE, name], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_mkl_took_avx2(res["mkl"], res["debug_type"])
    assert res["fast"], "no depthwise layer took the fast path"
    assert res["logits"] <= 1e-4 * max(1.0, res["logits_scale"])
    assert res["same_keys"]
    for key, diff in res["grads"].items():
        assert diff <= 1e-4 * res["scale"], (key, diff, res["scale"])


def test_parameter_names_and_keys_are_paddles(op):
    """Optimizer state (.pdopt) is keyed by parameter names, which Paddle derives from the layer
    class name: they must be those of nn.Conv2D, for our older checkpoints and PaddleClas's."""
    layer = Conv2D(8, 8, 3, padding=1, groups=8, bias_attr=False)
    plain = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8, bias_attr=False)
    assert layer.weight.name.split("_")[0] == plain.weight.name.split("_")[0] == "conv2d"
    assert list(layer.state_dict()) == list(plain.state_dict()) == ["weight"]
    assert layer._depthwise and not Conv2D(8, 16, 3, groups=8)._depthwise and not Conv2D(8, 8, 3, groups=1)._depthwise
    assert not Conv2D(8, 8, 3, padding=1, groups=8)._depthwise  # a bias: the kernel adds none
    assert not Conv2D(8, 8, 3, groups=8, dilation=2)._depthwise and not Conv2D(8, 8, 3, groups=8, stride=[2, 1])._depthwise


def test_an_export_holds_only_paddles_convolution(op, tmp_path):
    from ppcls_ft.engine.export import export_dygraph
    model = build_model({"name": "PPLCNet_x0_25", "class_num": 3}, load_weights=False)
    out = export_dygraph(model, tmp_path, [3, 32, 32], [{"ToCHWImage": None}], export_onnx=False)
    graph = (out / "inference.json").read_text()
    assert "ppcls_dwconv" not in graph  # a static graph takes Paddle's convolution
    assert "conv2d" in graph
    assert json.loads((out / "export_certificate.json").read_text())["passed"]


def test_stock_setting_and_a_failed_build_fall_back_to_paddles_kernel(monkeypatch, caplog):
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal([1, 4, 6, 6]).astype(np.float32))
    layer = Conv2D(4, 4, 3, padding=1, groups=4, bias_attr=False)
    ref = F.conv2d(x, layer.weight, padding=1, groups=4).numpy()
    monkeypatch.setattr(kernels, "_STATE", {"tried": False, "ops": None, "errors": {}})
    monkeypatch.setenv("PPCLS_FT_KERNELS", "stock")
    assert kernels.depthwise_op() is None and "PPCLS_FT_KERNELS=stock" in kernels.status()
    np.testing.assert_array_equal(layer(x).numpy(), ref)

    monkeypatch.setattr(kernels, "_STATE", {"tried": False, "ops": None, "errors": {}})
    monkeypatch.delenv("PPCLS_FT_KERNELS")

    def broken(lib):
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="ppcls_ft"):
        np.testing.assert_array_equal(layer(x).numpy(), ref)
    assert "ppcls_ft_cpu_kernels unavailable" in caplog.text and "g++: not found" in caplog.text
    assert kernels.status() == "stock kernels (build failed)"


def test_the_build_runs_in_a_child_and_leaves_this_processs_output_alone(monkeypatch, tmp_path,
                                                                          capfd):
    """While the compiler runs, other threads (the DataLoader's read-ahead) keep logging to this
    process's stdout; a failed build's output comes back in the error."""
    import threading
    import time

    monkeypatch.setenv("PPCLS_FT_KERNEL_DIR", str(tmp_path))
    printed = tmp_path / "printed"
    # the "compiler" runs until the other thread has printed, so the line falls inside the build
    monkeypatch.setattr(kernels, "_BUILD_CHILD", "import os, sys, time\n"
                        "print('cc1plus: error: bad flag'); sys.stdout.flush()\n"
                        f"deadline = time.time() + 30\n"
                        f"while not os.path.exists({str(printed)!r}) and time.time() < deadline:\n"
                        "    time.sleep(0.05)\n"
                        "sys.exit(3)")

    def other_thread():
        while not list(tmp_path.glob("*/.lock")):  # _build holds the lock while the child runs
            time.sleep(0.05)
        time.sleep(0.3)
        print("a reader thread's line", flush=True)
        printed.touch()

    reader = threading.Thread(target=other_thread, daemon=True)
    reader.start()
    with pytest.raises(RuntimeError, match=r"exited with 3.*cc1plus: error: bad flag"):
        kernels._build(kernels.CORE)
    reader.join()
    out, _ = capfd.readouterr()
    assert "a reader thread's line" in out
    assert "cc1plus" not in out  # the compiler's own output is kept out of the user's log
