"""Shared fixtures: the ../shared assets (skipped with a reason when absent) and tiny datasets."""
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def assert_mkl_took_avx2(mkl_version, debug_type):
    """The premise of a comparison on MKL's AVX2 path (PPCLS_FT_MKL=avx2): MKL really took it.
    On Intel MKL's version string names it "AVX2"; on AMD it names the forced path only "Intel(R)
    Architecture processors", so there the setting (MKL_DEBUG_CPU_TYPE=5) and the absence of
    "AVX-512" say it."""
    from ppcls_ft import _cpu

    if _cpu.cpu_vendor() == "AMD":
        assert debug_type == "5" and "AVX-512" not in mkl_version, (debug_type, mkl_version)
    else:
        assert "AVX2" in mkl_version, mkl_version


def output_and_grads(fn, arrays, grad_out):
    """``fn`` applied to tensors made from ``arrays``, backpropagated from ``grad_out``: the
    output and each input's gradient, as numpy arrays (the kernel tests compare two of these)."""
    import paddle

    tensors = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
    y = fn(*tensors)
    y.backward(paddle.to_tensor(grad_out))
    return [y.numpy()] + [t.grad.numpy() for t in tensors]


def shared_dir():
    return Path(os.environ.get("PPCLS_FT_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared():
    """Path to ../shared (PPCLS_FT_SHARED); skips the test when it is not there."""
    path = shared_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"shared assets not found at {path} (set PPCLS_FT_SHARED)")
    return path


def write_tiny_dataset(root, classes=3, per_class=4, size=(40, 48), seed=0):
    """Write a PaddleClas-format dataset of small JPEGs; returns (root, train_list, label_list)."""
    import cv2

    root = Path(root)
    rng = np.random.default_rng(seed)
    lines = []
    for c in range(classes):
        (root / "images" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((size[0], size[1], 3), np.uint8)
            img[..., c % 3] = 200  # each class has its own dominant colour
            img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
            rel = f"images/c{c}/{i}.jpg"
            cv2.imwrite(str(root / rel), img)
            lines.append(f"{rel} {c}")
    (root / "train_list.txt").write_text("\n".join(lines) + "\n")
    (root / "label_list.txt").write_text("".join(f"{c} class{c}\n" for c in range(classes)))
    return root, root / "train_list.txt", root / "label_list.txt"


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def cpu_kernels():
    """ppcls_ft's compiled CPU operators (ppcls_ft/kernels), built on first use; skips without a
    C++ compiler (the stock kernels serve then), fails when a build that could run did not."""
    import shutil

    from ppcls_ft import kernels

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the stock kernels serve (tested apart)")
    built = kernels.ops()
    assert built is not None, f"the kernel build failed: {kernels._STATE['errors']}"
    return built
