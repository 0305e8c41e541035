"""Faster CPU training kernels: Paddle custom operators built on first use, the stock kernels
wherever they cannot run.

``depthwise_conv.cc``: depthwise convolution forward and backward (why by hand: its header).
``models/layers.py``'s ``conv2d`` gives every depthwise convolution of the CNN families a layer
that calls it in dygraph on the CPU in float32; everything else (static graphs, so exports and
``paddle.jit``; GPUs; AMP dtypes; dilation; rectangular strides) runs Paddle's own ``conv2d``, so
an exported model never contains the custom operator.

The operator is compiled once per machine, at the first depthwise convolution a process runs,
with ``paddle.utils.cpp_extension.load`` in a child process (gcc, about 15 s) into
``~/.cache/ppcls_ft/kernels/<paddle version>-<source hash>-cpu<CPU model and flags>``
(``PPCLS_FT_KERNEL_DIR`` moves it), under a file lock so that the ranks of a multi-process run
build it once and none loads a half-written library. A build that
fails (no compiler, no Python headers) is logged once with its reason and the stock kernels serve;
so does ``PPCLS_FT_KERNELS=stock`` in the environment. Values equal the stock kernel's (the
forward bit for bit while Paddle's im2col GEMM runs on MKL's AVX2 path, within the last bits on its
AVX-512 path; gradients within 1e-5 relative; tests/test_kernels.py).
"""
import contextlib
import hashlib
import logging
import os
from pathlib import Path

from .._cpu import cpuinfo_line, kernel_cache_root

_SOURCE = Path(__file__).with_name("depthwise_conv.cc")
_STATE = {"tried": False, "op": None, "error": None}


def enabled():
    return os.environ.get("PPCLS_FT_KERNELS", "auto").strip().lower() not in ("stock", "0", "off")


def _cpu_key():
    """The CPU the library is built for (-march=native): a build must never be loaded on another
    kind of CPU (a shared home or a copied cache would crash it with an illegal instruction)."""
    model, flags = cpuinfo_line("model name") or "", cpuinfo_line("flags") or ""
    return hashlib.sha256((model + flags).encode()).hexdigest()[:8]


def build_dir():
    import paddle

    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    return kernel_cache_root() / f"paddle{paddle.__version__}-{digest}-cpu{_cpu_key()}"


NAME = "ppcls_ft_dwconv"


def _load_built(out_dir):
    """The operator from an earlier build in ``out_dir``, or None. Registering the library
    directly takes milliseconds; ``cpp_extension.load`` re-checks the build (about 1.5 s per
    process) and writes a new Python wrapper file each time."""
    library = out_dir / NAME / f"{NAME}.so"
    if not library.is_file():
        return None
    from paddle import _C_ops
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    load_op_meta_info_and_register_op(str(library))

    def ppcls_dwconv(x, weight, stride, padding):
        return _C_ops._run_custom_op("ppcls_dwconv", x, weight, stride, padding)[0]

    return ppcls_dwconv


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
    # libiomp5 is Paddle's OpenMP runtime (see depthwise_conv.cc); -march=native: the build is
    # per machine, and the cache directory is too unless PPCLS_FT_KERNEL_DIR is shared.
    args = {"name": NAME, "sources": [str(_SOURCE)], "out_dir": str(out_dir),
            "cflags": ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
            "ldflags": [f"-L{libs}", "-l:libiomp5.so", f"-Wl,-rpath,{libs}"]}
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        op = _load_built(out_dir)  # built earlier, or by another process while this one waited
        if op is not None:
            return op
        logging.getLogger("ppcls_ft").info("building ppcls_ft's CPU kernels for this machine "
                                           f"(once, about 15 s) in {out_dir}")
        try:  # cwd: a stray paddle/ or json.py in the user's folder must not shadow the real ones
            child = subprocess.run([sys.executable, "-c", _BUILD_CHILD, json.dumps(args)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", cwd=out_dir, timeout=_BUILD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the build took over {_BUILD_TIMEOUT} s and was stopped") from None
        op = _load_built(out_dir) if child.returncode == 0 else None
        if op is None:
            what = (f"exited with {child.returncode}" if child.returncode else
                    f"wrote no {NAME}.so")
            raise RuntimeError(f"the build {what}; build log: {child.stdout[-1500:]}")
        return op


def depthwise_op():
    """The compiled operator, or None (disabled, or the build failed: logged once)."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        if enabled():
            try:
                _STATE["op"] = _build()
            except Exception as exc:  # noqa: BLE001
                _STATE["error"] = str(exc)
                logging.getLogger("ppcls_ft").warning(
                    f"fast CPU kernels unavailable, using Paddle's own ({str(exc)[:500]}); set "
                    "PPCLS_FT_KERNELS=stock to skip the build")
    return _STATE["op"]


def status():
    """One line for the start-up banner."""
    if not enabled():
        return "stock kernels (PPCLS_FT_KERNELS=stock)"
    if not _STATE["tried"]:
        return "ppcls_ft CPU kernels (depthwise conv; loaded, or built once, at first use)"
    return "ppcls_ft CPU kernels: depthwise conv" if _STATE["op"] else "stock kernels (build failed)"


@contextlib.contextmanager
def stock():
    """Within the block, every layer uses Paddle's own kernels (tests compare the two)."""
    saved = dict(_STATE)
    _STATE.update(tried=True, op=None)
    try:
        yield
    finally:
        _STATE.update(saved)
