"""CPU fast-path environment that must be set before Paddle loads its math library.

Paddle 3.3.1 bundles MKL 2019.0 Update 5. On a CPU whose vendor string is not Intel's, MKL takes
its generic code path, about 3x slower than AVX2 (shared/guide/PERFORMANCE.md section 2; ResNet50
training 1.27 -> 2.93 images/s on a 2-core EPYC). Two ways out, both needed before MKL loads:

- ``MKL_DEBUG_CPU_TYPE=5``: MKL's own switch to its AVX2 path. It cannot select AVX-512.
- On an AMD CPU with AVX-512 (Zen 4 and later), MKL's AVX-512 path is another 1.7-1.9x on a
  matrix product (2 threads, 2048x2048: 173 -> 300 GFLOP/s; docs/benchmarks/train_speed.md).
  MKL asks one exported function, ``mkl_serv_intel_cpu_true``, whether the CPU is Intel's, and
  then dispatches on the CPUID feature bits it reads itself. A two-line library that answers 1,
  loaded with RTLD_GLOBAL ahead of MKL, takes precedence over MKL's own definition (MKL calls
  it through its PLT), so MKL picks the code path the CPU's features allow. No package on PyPI
  provides this, so it is compiled here, once, with the system C compiler (about 50 ms).

A user's own ``MKL_DEBUG_CPU_TYPE`` wins (then nothing is loaded), ``PPCLS_FT_MKL=avx2`` keeps
the environment variable route; without a compiler it is the route taken. On an Intel CPU MKL
picks its best path itself; there ``PPCLS_FT_MKL=avx2`` sets MKL's own
``MKL_ENABLE_INSTRUCTIONS=AVX2`` (unless the user set it), so the switch means the same on
either vendor (benchmarks and tests compare the two paths). ``mkl_path()`` reports
what MKL chose. This module imports nothing heavy so ``ppcls_ft/__init__.py`` can run it before
anything imports paddle.
"""
import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
_AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")  # MKL's AVX-512 path needs all
STATE = {"route": None, "error": None}


def _cpuinfo_head(size=1 << 14):
    """The start of /proc/cpuinfo (the first processor's block), or None where it is unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(size)
    except OSError:
        return None


def cpuinfo_line(key):
    """The first processor's ``key`` line of /proc/cpuinfo (e.g. ``"flags"``), whole; "" when
    absent, None when /proc/cpuinfo is unreadable. The one reader of it in ppcls_ft."""
    head = _cpuinfo_head()
    if head is None:
        return None
    return next((ln for ln in head.splitlines() if ln.startswith(key)), "")


def kernel_cache_root():
    """Where compiled helpers live: ``PPCLS_FT_KERNEL_DIR``, else ``~/.cache/ppcls_ft/kernels``."""
    return Path(os.environ.get("PPCLS_FT_KERNEL_DIR") or Path.home() / ".cache" / "ppcls_ft" / "kernels")


def cpu_vendor():
    """'AMD', 'Intel' or 'unknown', read from /proc/cpuinfo (Linux) without importing paddle."""
    head = _cpuinfo_head(4096) or ""
    if "AuthenticAMD" in head:
        return "AMD"
    if "GenuineIntel" in head:
        return "Intel"
    return "unknown"


def has_avx512():
    flags = (cpuinfo_line("flags") or "").split()
    return all(flag in flags for flag in _AVX512)


def _shim_path():
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:12]
    return kernel_cache_root() / f"mkl-vendor-shim-{digest}.so"


def _build_shim(path):
    """Compile the shim into ``path`` (atomically: concurrent processes each rename a whole file)."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]
    if compiler[0] is None:
        raise RuntimeError("no C compiler (cc, gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        src.write_text(_SHIM_SOURCE)
        proc = subprocess.run(compiler + ["-shared", "-fPIC", "-O2", "-o", str(out), str(src)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {proc.stdout.strip()[-300:]}")
        os.replace(out, path)


def _load_shim():
    def load(path):
        if not path.is_file():
            _build_shim(path)
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)

    path = _shim_path()
    try:
        load(path)
    except OSError:  # a read-only cache or a damaged file there: build a private copy, once
        load(Path(tempfile.mkdtemp(prefix="ppcls_ft-mkl-")) / path.name)


def prepare_cpu_env():
    """Select MKL's fastest path on AMD unless the user already chose; returns the CPU vendor."""
    vendor = cpu_vendor()
    wanted = os.environ.get("PPCLS_FT_MKL", "auto").strip().lower()
    if vendor != "AMD":  # MKL picks its best path itself; PPCLS_FT_MKL=avx2 caps it
        # AVX2 already set: by the user, or by this setting in a parent process (a launcher)
        if wanted == "avx2" and os.environ.get("MKL_ENABLE_INSTRUCTIONS", "AVX2").upper() == "AVX2":
            os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
            STATE["route"] = "avx2"
            if "paddle" in sys.modules:
                STATE["error"] = "paddle was imported before ppcls_ft"
        elif "MKL_ENABLE_INSTRUCTIONS" in os.environ or "MKL_DEBUG_CPU_TYPE" in os.environ:
            STATE["route"] = "user"
        else:
            STATE["route"] = "native"
        return vendor
    if "MKL_DEBUG_CPU_TYPE" in os.environ:  # on AMD only this one gets MKL past its vendor check
        STATE["route"] = "user"
        return vendor
    if "paddle" in sys.modules:  # MKL may be loaded and bound already: only the variable can help
        STATE["error"] = "paddle was imported before ppcls_ft"
    elif wanted != "avx2" and has_avx512():
        try:
            _load_shim()
            STATE["route"] = "shim"
            return vendor
        except Exception as exc:  # noqa: BLE001 - no compiler, a hung one, anything: importing
            STATE["error"] = str(exc)[:300]  # ppcls_ft must not fail for a speed-up
    os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    STATE["route"] = "avx2"
    return vendor


class _MKLVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                ("product_status", ctypes.c_char_p), ("build", ctypes.c_char_p),
                ("processor", ctypes.c_char_p), ("platform", ctypes.c_char_p)]


def mkl_path():
    """MKL's own name for the code path it runs (e.g. 'Intel(R) Advanced Vector Extensions 512
    (Intel(R) AVX-512) ... enabled processors'), or None when Paddle's MKL is not found. Loads
    MKL (Paddle's bundled copy), so call it after the environment is prepared."""
    try:
        import paddle

        lib = ctypes.CDLL(str(Path(paddle.__file__).parent / "libs" / "libmklml_intel.so"))
    except OSError:
        return None
    version = _MKLVersion()
    lib.MKL_Get_Version(ctypes.byref(version))
    return (version.processor or b"").decode(errors="replace").strip() or None


def mkl_route_text():
    """One phrase for the start-up banner: which MKL path this process takes, and why. On the
    shim route it asks MKL itself, so a shim MKL ignored is said, not assumed."""
    route = STATE["route"]
    if route == "shim":
        path = mkl_path() or "unknown"
        if "AVX-512" not in path:
            return (f"MKL path {path!r}, not AVX-512: MKL ignored ppcls_ft's vendor shim "
                    "(set PPCLS_FT_MKL=avx2 for its AVX2 path)")
        return "MKL AVX-512 path on AMD (ppcls_ft's vendor shim; PPCLS_FT_MKL=avx2 turns it off)"
    if route == "avx2" and cpu_vendor() != "AMD":
        path = mkl_path() or "unknown"
        if "AVX2" not in path:  # e.g. paddle was imported first and MKL had chosen already
            return f"MKL path {path!r}, not AVX2, although PPCLS_FT_MKL=avx2 asked for it"
        return "MKL AVX2 path (MKL_ENABLE_INSTRUCTIONS=AVX2, from PPCLS_FT_MKL=avx2)"
    if route == "avx2":
        why = f"; AVX-512 shim unavailable: {STATE['error']}" if STATE["error"] else ""
        return f"MKL AVX2 path for AMD (MKL_DEBUG_CPU_TYPE=5{why})"
    if route == "user":
        keys = ("MKL_DEBUG_CPU_TYPE", "MKL_ENABLE_INSTRUCTIONS")
        return ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) + " (set by the user)"
    return "MKL native path"


# glibc's mallopt parameters (malloc.h): never serve an allocation with its own mmap, and never
# return the heap's free top to the system.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Make freed tensor memory stay in this process for the next step. Returns a phrase for the
    banner, or None when not applied (not glibc, or ``PPCLS_FT_MALLOC=system``).

    Paddle's CPU tensors come from malloc. glibc serves every block above its mmap threshold
    (128 KB to 32 MB) with a fresh mmap and unmaps it on free, so every large activation and
    gradient of every step is page-faulted in again, 4 KB at a time: on these 2-core VMs a
    38 MB elementwise add took 40 ms instead of 5.5, a [25088, 384] x [384, 384] matmul 48 ms
    instead of 20, and MobileNetV2 trained at 34 instead of 48 images/s (160 px, batch 32). With
    these two settings freed blocks go back to the heap and are reused; the heap stays at the
    step's peak instead of being given back and faulted in again. No allocator on PyPI can be
    switched to inside a running process (jemalloc and tcmalloc need LD_PRELOAD), hence mallopt.
    It is process-wide and stays for the process's life (forked loader workers inherit it): the
    resident memory becomes the high-water mark of the run so far, not what is in use now.
    """
    if os.environ.get("PPCLS_FT_MALLOC", "auto").strip().lower() == "system":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):  # musl, macOS: no glibc mallopt
        return None
    return "freed memory reused (glibc heap; PPCLS_FT_MALLOC=system turns it off)" if ok else None
