"""Faster CPU training kernels: Paddle custom operators built on first use, the stock kernels
wherever they cannot run.

Two libraries, built and loaded apart so that one failing leaves the other:

* ``ppcls_ft_cpu_kernels`` (``depthwise_conv.cc``: depthwise convolution forward and backward;
  ``norm_act.cc``: LayerNorm over the last axis, exact GELU, hardswish and training-mode batch
  norm, forward and backward). Needs only gcc.
* ``ppcls_ft_onednn_conv`` (``onednn_conv.cc``: dense convolution through oneDNN's primitives,
  linked against the ``libdnnl.so.3`` in Paddle's wheel). Paddle ships that library but not its
  API headers; they come from PyPI's ``onednn-devel`` (``make install`` installs it, with
  ``--no-deps``: its dependencies are a 600 MB SYCL runtime that nothing here uses), found in
  the environment's ``include/`` or ``PPCLS_FT_ONEDNN_INCLUDE`` (``onednn_headers.py``).

Why by hand: each source file's header. ``models/layers.py`` gives the layers that call them
(``Conv2D``, ``LayerNorm``, ``GELU``, ``Hardswish``, ``BatchNorm2D``) in dygraph on the CPU in
float32; everything else (static graphs, so exports and ``paddle.jit``; GPUs; AMP dtypes;
dilation) runs Paddle's own kernels, so an exported model never contains a custom operator.

Each library is compiled once per machine, at the first layer a process runs that uses it, with
``paddle.utils.cpp_extension.load`` in a child process (gcc, about 20 s) into
``~/.cache/ppcls_ft/kernels/<library>-<paddle version>-<source hash>-cpu<CPU model and flags>``
(``PPCLS_FT_KERNEL_DIR`` moves it), under a file lock so that the ranks of a multi-process run
build it once and none loads a half-written library. A build that fails (no compiler, no Python
headers, no oneDNN headers) is logged once with its reason and the stock kernels serve; so does
``PPCLS_FT_KERNELS=stock`` in the environment. Values equal the stock kernels' within 1e-5
relative (tests/test_kernels.py, tests/test_norm_act_kernels.py, tests/test_onednn_conv.py).
"""
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

from .._cpu import cpuinfo_line, kernel_cache_root
from . import onednn_headers

_HERE = Path(__file__).parent
_STATE = {"tried": False, "ops": None, "errors": {}}
OPS = ("dwconv", "layer_norm", "gelu", "hardswish", "batch_norm", "conv2d")


def enabled():
    return os.environ.get("PPCLS_FT_KERNELS", "auto").strip().lower() not in ("stock", "0", "off")


def _cpu_key():
    """The CPU the library is built for (-march=native): a build must never be loaded on another
    kind of CPU (a shared home or a copied cache would crash it with an illegal instruction)."""
    model, flags = cpuinfo_line("model name") or "", cpuinfo_line("flags") or ""
    return hashlib.sha256((model + flags).encode()).hexdigest()[:8]


def _paddle_libs():
    import paddle

    return Path(paddle.__file__).parent / "libs"


class Library(NamedTuple):
    name: str
    sources: list
    cflags: list
    ldflags: Callable  # () -> list: needs Paddle's install path
    # () -> text that must be in the cache digest (what the build depends on besides the
    # sources); raises RuntimeError naming what is missing
    fingerprint: Callable
    stage: Callable  # (build directory) -> extra compiler flags (files it puts there)
    wrap: Callable  # (path of the built .so) -> dict of operator functions


def _wrap_core(library):
    from paddle import _C_ops
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    load_op_meta_info_and_register_op(str(library))

    def dwconv(x, weight, stride, padding):
        return _C_ops._run_custom_op("ppcls_dwconv", x, weight, stride, padding)[0]

    def layer_norm(x, scale, bias, epsilon):
        return _C_ops._run_custom_op("ppcls_layer_norm", x, scale, bias, float(epsilon))[0]

    def gelu(x):
        return _C_ops._run_custom_op("ppcls_gelu", x)[0]

    def batch_norm(x, scale, bias, epsilon, activation="", channels_last=False):
        """Training-mode batch norm, then ``activation`` ("", "relu", "relu6", "hardswish") in the
        same pass: (out, batch mean, biased batch variance). ``channels_last``: x is N, ..., C."""
        out, mean, _, var = _C_ops._run_custom_op("ppcls_batch_norm", x, scale, bias,
                                                  float(epsilon), activation, bool(channels_last))
        return out, mean, var

    def hardswish(x):
        return _C_ops._run_custom_op("ppcls_hardswish", x)[0]

    return dict(dwconv=dwconv, layer_norm=layer_norm, gelu=gelu, hardswish=hardswish,
                batch_norm=batch_norm)


def _wrap_onednn(library):
    from paddle import _C_ops
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    load_op_meta_info_and_register_op(str(library))

    def conv2d(x, weight, strides, paddings, channels_last=False):
        """Dense convolution, no bias: ``strides`` [sh, sw], ``paddings`` [top, bottom, left,
        right]; x NCHW, or NHWC with ``channels_last`` (the weight is OIHW either way). The
        backward computes only the gradients of inputs that take one."""
        return _C_ops._run_custom_op("ppcls_conv2d", x, weight, list(strides), list(paddings),
                                     not x.stop_gradient, not weight.stop_gradient,
                                     bool(channels_last))[0]

    return dict(conv2d=conv2d)


# -march=native: the build is per machine (so is the cache directory, unless PPCLS_FT_KERNEL_DIR
# is shared). -fno-trapping-math: without it gcc vectorises none of norm_act.cc's GELU loop (the
# float-to-int step of its exponential might raise an FP exception); no value changes.
# libiomp5 is Paddle's OpenMP runtime (see depthwise_conv.cc).
CORE = Library(
    name="ppcls_ft_cpu_kernels",
    sources=[_HERE / "depthwise_conv.cc", _HERE / "norm_act.cc"],
    cflags=["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"],
    ldflags=lambda: [f"-L{_paddle_libs()}", "-l:libiomp5.so", f"-Wl,-rpath,{_paddle_libs()}"],
    fingerprint=lambda: "", stage=lambda out_dir: [], wrap=_wrap_core)

# No -march: the file only calls oneDNN, which picks its kernels by the CPU at run time.
ONEDNN = Library(
    name="ppcls_ft_onednn_conv",
    sources=[_HERE / "onednn_conv.cc"],
    cflags=["-O2", "-DNDEBUG"],
    ldflags=lambda: [f"-L{_paddle_libs()}", "-l:libdnnl.so.3", f"-Wl,-rpath,{_paddle_libs()}"],
    fingerprint=lambda: onednn_headers.fingerprint(_paddle_libs() / "libdnnl.so.3"),
    stage=lambda out_dir: onednn_headers.stage(out_dir, _paddle_libs() / "libdnnl.so.3"),
    wrap=_wrap_onednn)

LIBRARIES = (CORE, ONEDNN)


def build_dir(lib, extra=""):
    import paddle

    # ldflags: the rpath names this environment's Paddle, so a shared PPCLS_FT_KERNEL_DIR keeps
    # one build per environment
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in lib.sources)
                            + " ".join(lib.cflags + lib.ldflags()).encode()
                            + extra.encode()).hexdigest()[:12]
    return kernel_cache_root() / f"{lib.name}-paddle{paddle.__version__}-{digest}-cpu{_cpu_key()}"


def _load_built(lib, out_dir):
    """``lib``'s operators from an earlier build in ``out_dir`` (a dict of functions), or None.
    Registering the library directly takes milliseconds; ``cpp_extension.load`` re-checks the
    build (about 1.5 s per process) and writes a new Python wrapper file each time."""
    library = out_dir / lib.name / f"{lib.name}.so"
    return lib.wrap(library) if library.is_file() else None


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


_BUILD_TIMEOUT = 600  # s; about 20 on these cores. A hung compiler must not hold every rank's lock.


def _build(lib):
    """Load ``lib``, building it first if no earlier build is cached; RuntimeError on failure."""
    import fcntl
    import json
    import subprocess
    import sys

    out_dir = build_dir(lib, lib.fingerprint())
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ops = _load_built(lib, out_dir)  # built earlier, or by another process while this one waited
        if ops is not None:
            return ops
        args = {"name": lib.name, "sources": [str(src) for src in lib.sources],
                "out_dir": str(out_dir), "cflags": lib.cflags + lib.stage(out_dir),
                "ldflags": lib.ldflags()}
        logging.getLogger("ppcls_ft").info(f"building {lib.name} for this machine "
                                           f"(once, about 20 s) in {out_dir}")
        try:  # cwd: a stray paddle/ or json.py in the user's folder must not shadow the real ones
            child = subprocess.run([sys.executable, "-c", _BUILD_CHILD, json.dumps(args)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", cwd=out_dir, timeout=_BUILD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the build took over {_BUILD_TIMEOUT} s and was stopped") from None
        ops = _load_built(lib, out_dir) if child.returncode == 0 else None
        if ops is None:
            what = (f"exited with {child.returncode}" if child.returncode else
                    f"wrote no {lib.name}.so")
            raise RuntimeError(f"the build {what}; build log: {child.stdout[-1500:]}")
        return ops


def ops():
    """The compiled operators: a namespace with each of ``OPS`` (``.dwconv``, ``.layer_norm``,
    ``.gelu``, ``.hardswish``, ``.batch_norm``, ``.conv2d``), None where its library is
    unavailable; None instead of the namespace when none is (disabled, or every build failed:
    each failure logged once)."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        if enabled():
            found = {}
            for lib in LIBRARIES:
                try:
                    found.update(_build(lib))
                except Exception as exc:  # noqa: BLE001
                    _STATE["errors"][lib.name] = str(exc)
                    logging.getLogger("ppcls_ft").warning(
                        f"{lib.name} unavailable, its layers use Paddle's own kernels "
                        f"({str(exc)[:500]}); set PPCLS_FT_KERNELS=stock to skip the build")
            if found:
                _STATE["ops"] = SimpleNamespace(**{name: found.get(name) for name in OPS})
    return _STATE["ops"]


def op(name):
    """One compiled operator by its name in ``OPS``, or None."""
    built = ops()
    return None if built is None else getattr(built, name)


def depthwise_op():
    """The depthwise convolution operator, or None."""
    return op("dwconv")


_WHAT = {CORE.name: "depthwise conv, batch norm, LayerNorm, GELU, hardswish",
         ONEDNN.name: "oneDNN dense conv"}


def status():
    """One line for the start-up banner."""
    if not enabled():
        return "stock kernels (PPCLS_FT_KERNELS=stock)"
    if not _STATE["tried"]:
        return (f"ppcls_ft CPU kernels ({'; '.join(_WHAT.values())}; loaded, or built once, at "
                "first use)")
    if _STATE["ops"] is None:
        return "stock kernels (build failed)"
    have = [_WHAT[lib.name] for lib in LIBRARIES if lib.name not in _STATE["errors"]]
    lacking = [f"stock {lib.name} ({_STATE['errors'][lib.name][:80]})"
               for lib in LIBRARIES if lib.name in _STATE["errors"]]
    return "ppcls_ft CPU kernels: " + "; ".join(have + lacking)


@contextlib.contextmanager
def stock():
    """Within the block, every layer uses Paddle's own kernels (tests compare the two)."""
    saved = dict(_STATE)
    _STATE.update(tried=True, ops=None)
    try:
        yield
    finally:
        _STATE.update(saved)
