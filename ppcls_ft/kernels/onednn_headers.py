"""oneDNN's C++ API headers for ``onednn_conv.cc``, matched to the oneDNN library Paddle ships.

Paddle's CPU wheel carries ``paddle/libs/libdnnl.so.3`` (the OpenMP build of oneDNN 3.6) and,
under ``paddle/include/third_party/install/onednn/include``, only forwarding headers whose
targets (``oneapi/dnnl/*``) it omits. PyPI's ``onednn-devel`` has the real headers (2025.0.1 is
oneDNN 3.6.1; headers only, 204 KB), installed into the environment's ``include/``. Its
``dnnl_config.h`` describes the SYCL/TBB build, so the build gets a copy of the headers whose
``dnnl_config.h`` states the threading and GPU runtimes Paddle's library reports about itself
(``dnnl_version()``): a header saying TBB or SYCL over an OpenMP library would compile the wrong
interop code. Within one major.minor release oneDNN keeps its ABI, so the headers' release must
match the library's in major and minor.
"""
import ctypes
import hashlib
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

PIN = "onednn-devel==2025.0.1"
INSTALL_HINT = f"pip install --no-deps {PIN} (make install does)"
# dnnl_config.h's values (DNNL_RUNTIME_*)
_RUNTIMES = {0: "DNNL_RUNTIME_NONE", 1: "DNNL_RUNTIME_SEQ", 2: "DNNL_RUNTIME_OMP",
             4: "DNNL_RUNTIME_TBB", 8: "DNNL_RUNTIME_THREADPOOL", 256: "DNNL_RUNTIME_OCL",
             512: "DNNL_RUNTIME_SYCL"}


def find():
    """The include directory holding ``oneapi/dnnl/dnnl.hpp``: ``PPCLS_FT_ONEDNN_INCLUDE``, else
    this environment's ``include/`` (where pip puts onednn-devel's headers). RuntimeError if
    neither has it."""
    env = os.environ.get("PPCLS_FT_ONEDNN_INCLUDE")
    places = [Path(env)] if env else [Path(sysconfig.get_path("data")) / "include",
                                      Path(sys.prefix) / "include"]
    for place in places:
        if (place / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            return place
    where = " or ".join(str(p) for p in places)
    raise RuntimeError(f"oneDNN's C++ headers are not in {where}: {INSTALL_HINT}")


def header_version(include):
    text = (include / "oneapi" / "dnnl" / "dnnl_version.h").read_text(errors="replace")
    parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise RuntimeError(f"{include}/oneapi/dnnl/dnnl_version.h names no DNNL_VERSION_*")
    return tuple(int(m.group(1)) for m in parts)


class _Version(ctypes.Structure):  # dnnl_version_t (dnnl_types.h)
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]


def library_version(library):
    """(major, minor, patch, cpu runtime, gpu runtime) as the library reports them."""
    lib = ctypes.CDLL(str(library))
    lib.dnnl_version.restype = ctypes.POINTER(_Version)
    v = lib.dnnl_version().contents
    return v.major, v.minor, v.patch, v.cpu_runtime, v.gpu_runtime


def fingerprint(library):
    """What a build against these headers and ``library`` depends on, as text for the cache key;
    RuntimeError when the headers are missing or of another release."""
    if not Path(library).is_file():
        raise RuntimeError(f"Paddle's oneDNN library {library} is missing")
    include = find()
    headers = header_version(include)
    major, minor, patch, cpu, gpu = library_version(library)
    if headers[:2] != (major, minor):
        raise RuntimeError(f"oneDNN's headers in {include} are release {'.'.join(map(str, headers))}"
                           f", Paddle's library is {major}.{minor}.{patch}: install the headers of "
                           f"release {major}.{minor} ({INSTALL_HINT} matches Paddle 3.3)")
    if cpu not in _RUNTIMES or gpu not in _RUNTIMES:
        raise RuntimeError(f"{library} reports unknown runtimes (cpu {cpu}, gpu {gpu})")
    # every header byte and this file's staging: a same-release header set built differently,
    # or a change here, must not reuse an old build
    content = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted((include / "oneapi").rglob("*")):
        if path.is_file():
            content.update(str(path.relative_to(include)).encode() + path.read_bytes())
    return (f"headers {headers} {content.hexdigest()[:16]} library {(major, minor, patch)} "
            f"runtimes {cpu} {gpu}")


def stage(out_dir, library):
    """Copy the headers into ``out_dir/include`` with a ``dnnl_config.h`` stating the library's
    runtimes; returns the compiler flags that put the copy first."""
    include = find()
    *_, cpu, gpu = library_version(library)
    target = Path(out_dir) / "include"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(include / "oneapi", target / "oneapi")
    config = target / "oneapi" / "dnnl" / "dnnl_config.h"
    text = config.read_text()
    for macro, value in (("DNNL_CPU_THREADING_RUNTIME", cpu), ("DNNL_CPU_RUNTIME", cpu),
                         ("DNNL_GPU_RUNTIME", gpu)):
        text, count = re.subn(rf"^#define {macro} .*$", f"#define {macro} {_RUNTIMES[value]}",
                              text, flags=re.M)
        if count != 1:
            raise RuntimeError(f"{config}: expected one '#define {macro}', found {count}")
    text = re.sub(r"^#define DNNL_WITH_SYCL\b.*$", "", text, flags=re.M)
    text, count = re.subn(r"^#define ONEAPI_DNNL_DNNL_CONFIG_H$",
                          "#define ONEAPI_DNNL_DNNL_CONFIG_H\n#define PPCLS_FT_STAGED_DNNL_CONFIG 1",
                          text, flags=re.M)
    if count != 1:
        raise RuntimeError(f"{config}: expected its include guard ONEAPI_DNNL_DNNL_CONFIG_H")
    config.write_text(text)
    # -iquote: searched before every -I directory for the headers' quoted includes, and
    # cpp_extension puts this environment's include/ (the unstaged copy) among its -I ones;
    # onednn_conv.cc stops the build unless the staged dnnl_config.h is the one it got
    return [f"-iquote{target}"]
