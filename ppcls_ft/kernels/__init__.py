"""Faster CPU training kernels: Paddle custom operators built on first use, the stock kernels
wherever they cannot run.

``depthwise_conv.cc``: depthwise convolution forward and backward; ``norm_act.cc``: LayerNorm over
the last axis, exact GELU, hardswish and training-mode batch norm, forward and backward (why by
hand: each file's header).
``models/layers.py`` gives the layers that call them (``Conv2D``'s depthwise case, ``LayerNorm``,
``GELU``, ``Hardswish``, ``BatchNorm2D``) in dygraph on the CPU in float32; everything else
(static graphs, so exports and ``paddle.jit``; GPUs; AMP dtypes; dilation; rectangular strides)
runs Paddle's own kernels, so an exported model never contains a custom operator.

The operators are compiled once per machine, at the first layer a process runs that uses one,
with ``paddle.utils.cpp_extension.load`` in a child process (gcc, about 20 s) into
``~/.cache/ppcls_ft/kernels/<paddle version>-<source hash>-cpu<CPU model and flags>``
(``PPCLS_FT_KERNEL_DIR`` moves it), under a file lock so that the ranks of a multi-process run
build it once and none loads a half-written library. A build that
fails (no compiler, no Python headers) is logged once with its reason and the stock kernels serve;
so does ``PPCLS_FT_KERNELS=stock`` in the environment. Values equal the stock kernels' (the
depthwise forward bit for bit while Paddle's im2col GEMM runs on MKL's AVX2 path, within the last
bits on its AVX-512 path; gradients within 1e-5 relative; LayerNorm, GELU and batch norm within
1e-5, hardswish bit for bit; tests/test_kernels.py, tests/test_norm_act_kernels.py).
"""
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace

from .._cpu import cpuinfo_line, kernel_cache_root

_SOURCES = [Path(__file__).with_name(name) for name in ("depthwise_conv.cc", "norm_act.cc")]
# -march=native: the build is per machine (so is the cache directory, unless PPCLS_FT_KERNEL_DIR
# is shared). -fno-trapping-math: without it gcc vectorises none of norm_act.cc's GELU loop (the
# float-to-int step of its exponential might raise an FP exception); no value changes.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
_STATE = {"tried": False, "ops": None, "error": None}


def enabled():
    return os.environ.get("PPCLS_FT_KERNELS", "auto").strip().lower() not in ("stock", "0", "off")


def _cpu_key():
    """The CPU the library is built for (-march=native): a build must never be loaded on another
    kind of CPU (a shared home or a copied cache would crash it with an illegal instruction)."""
    model, flags = cpuinfo_line("model name") or "", cpuinfo_line("flags") or ""
    return hashlib.sha256((model + flags).encode()).hexdigest()[:8]


def build_dir():
    import paddle

    digest = hashlib.sha256(b"".join(src.read_bytes() for src in _SOURCES)
                            + " ".join(_CFLAGS).encode()).hexdigest()[:12]
    return kernel_cache_root() / f"paddle{paddle.__version__}-{digest}-cpu{_cpu_key()}"


NAME = "ppcls_ft_cpu_kernels"


def _load_built(out_dir):
    """The operators from an earlier build in ``out_dir`` (a namespace of functions), or None.
    Registering the library directly takes milliseconds; ``cpp_extension.load`` re-checks the
    build (about 1.5 s per process) and writes a new Python wrapper file each time."""
    library = out_dir / NAME / f"{NAME}.so"
    if not library.is_file():
        return None
    from paddle import _C_ops
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    load_op_meta_info_and_register_op(str(library))

    def dwconv(x, weight, stride, padding):
        return _C_ops._run_custom_op("ppcls_dwconv", x, weight, stride, padding)[0]

    def layer_norm(x, scale, bias, epsilon):
        return _C_ops._run_custom_op("ppcls_layer_norm", x, scale, bias, float(epsilon))[0]

    def gelu(x):
        return _C_ops._run_custom_op("ppcls_gelu", x)[0]

    def batch_norm(x, scale, bias, epsilon):
        """Training-mode batch norm: (out, batch mean, biased batch variance)."""
        out, mean, _, var = _C_ops._run_custom_op("ppcls_batch_norm", x, scale, bias, float(epsilon))
        return out, mean, var

    def hardswish(x):
        return _C_ops._run_custom_op("ppcls_hardswish", x)[0]

    return SimpleNamespace(dwconv=dwconv, layer_norm=layer_norm, gelu=gelu, hardswish=hardswish,
                           batch_norm=batch_norm)


# Run in a child process: the compiler writes to file descriptors 1 and 2, and redirecting this
# process's descriptors while it builds would also swallow what its other threads log meanwhile
# (Paddle's single-process DataLoader reads ahead in a thread: a skipped image's warning vanished).
_BUILD_CHILD = """
import json, sys
from paddle.utils.cpp_extension import load
args = json.loads(sys.argv[1])
load(name=args["name"], sources=args["sources"], build_directory=args["out_dir"], verbose=False,
     extra_cxx_cflags=args["cflags"], extra_ldflags=args["ldflags"])
"""


_BUILD_TIMEOUT = 600  # s; about 15 on these cores. A hung compiler must not hold every rank's lock.


def _build():
    import fcntl
    import json
    import subprocess
    import sys

    import paddle

    out_dir = build_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    libs = Path(paddle.__file__).parent / "libs"
    # libiomp5 is Paddle's OpenMP runtime (see depthwise_conv.cc).
    args = {"name": NAME, "sources": [str(src) for src in _SOURCES], "out_dir": str(out_dir),
            "cflags": _CFLAGS,
            "ldflags": [f"-L{libs}", "-l:libiomp5.so", f"-Wl,-rpath,{libs}"]}
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ops = _load_built(out_dir)  # built earlier, or by another process while this one waited
        if ops is not None:
            return ops
        logging.getLogger("ppcls_ft").info("building ppcls_ft's CPU kernels for this machine "
                                           f"(once, about 20 s) in {out_dir}")
        try:  # cwd: a stray paddle/ or json.py in the user's folder must not shadow the real ones
            child = subprocess.run([sys.executable, "-c", _BUILD_CHILD, json.dumps(args)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", cwd=out_dir, timeout=_BUILD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the build took over {_BUILD_TIMEOUT} s and was stopped") from None
        ops = _load_built(out_dir) if child.returncode == 0 else None
        if ops is None:
            what = (f"exited with {child.returncode}" if child.returncode else
                    f"wrote no {NAME}.so")
            raise RuntimeError(f"the build {what}; build log: {child.stdout[-1500:]}")
        return ops


def ops():
    """The compiled operators (``.dwconv``, ``.layer_norm``, ``.gelu``, ``.hardswish``,
    ``.batch_norm``), or None
    (disabled, or the build failed: logged once)."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        if enabled():
            try:
                _STATE["ops"] = _build()
            except Exception as exc:  # noqa: BLE001
                _STATE["error"] = str(exc)
                logging.getLogger("ppcls_ft").warning(
                    f"fast CPU kernels unavailable, using Paddle's own ({str(exc)[:500]}); set "
                    "PPCLS_FT_KERNELS=stock to skip the build")
    return _STATE["ops"]


def depthwise_op():
    """The depthwise convolution operator, or None."""
    built = ops()
    return None if built is None else built.dwconv


def status():
    """One line for the start-up banner."""
    if not enabled():
        return "stock kernels (PPCLS_FT_KERNELS=stock)"
    if not _STATE["tried"]:
        return ("ppcls_ft CPU kernels (depthwise conv, batch norm, LayerNorm, GELU, hardswish; "
                "loaded, or built once, at first use)")
    return ("ppcls_ft CPU kernels: depthwise conv, batch norm, LayerNorm, GELU, hardswish" if _STATE["ops"]
            else "stock kernels (build failed)")


@contextlib.contextmanager
def stock():
    """Within the block, every layer uses Paddle's own kernels (tests compare the two)."""
    saved = dict(_STATE)
    _STATE.update(tried=True, ops=None)
    try:
        yield
    finally:
        _STATE.update(saved)
