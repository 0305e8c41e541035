"""ppcls_ft/_cpu.py: which MKL code path a process gets on this CPU, decided before Paddle loads.
Each case is a fresh interpreter, since MKL reads its environment once per process."""
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_mkl_took_avx2
from ppcls_ft import _cpu

REPO = Path(__file__).resolve().parents[1]
AMD_AVX512 = (_cpu.cpu_vendor() == "AMD" and _cpu.has_avx512()
              and (shutil.which("cc") or shutil.which("gcc")) is not None)

PROBE = """
import json, os, sys
import ppcls_ft
from ppcls_ft import _cpu
import numpy as np, paddle
paddle.base.core.set_num_threads(1)
a = paddle.to_tensor(np.random.default_rng(0).standard_normal([300, 500]).astype(np.float32))
np.save(sys.argv[1], paddle.matmul(a, a.T).numpy())
print(json.dumps({"route": _cpu.STATE["route"], "error": _cpu.STATE["error"],
                  "mkl": _cpu.mkl_path(), "debug_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
                  "banner": _cpu.mkl_route_text()}))
"""


def _clean_env(tmp_path, **env):
    """This environment without the MKL choices, this checkout first, a private helper cache."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("MKL_DEBUG_CPU_TYPE", "MKL_ENABLE_INSTRUCTIONS", "PPCLS_FT_MKL")}
    full.update(PYTHONPATH=str(REPO), PPCLS_FT_KERNEL_DIR=str(tmp_path / "cache"), **env)
    return full


def _probe(tmp_path, name, **env):
    full = _clean_env(tmp_path, **env)
    out = tmp_path / f"{name}.npy"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out)], env=full, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


NOT_AMD_AVX512 = ("the shim is for AMD CPUs with AVX-512 and needs a C compiler; this CPU is "
                  f"{_cpu.cpu_vendor()} {'with' if _cpu.has_avx512() else 'without'} AVX-512")


@pytest.mark.skipif(not AMD_AVX512, reason=NOT_AMD_AVX512)
def test_amd_with_avx512_gets_mkls_avx512_path_with_the_same_values(tmp_path):
    shim, fast = _probe(tmp_path, "shim")
    assert shim["route"] == "shim" and shim["debug_type"] is None
    assert "AVX-512" in (shim["mkl"] or "") and "AVX-512" in shim["banner"]
    assert list((tmp_path / "cache").glob("mkl-vendor-shim-*.so"))

    avx2, ref = _probe(tmp_path, "avx2", PPCLS_FT_MKL="avx2")
    assert avx2["route"] == "avx2" and avx2["debug_type"] == "5" and "AVX2" in avx2["banner"]
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not AMD_AVX512, reason=NOT_AMD_AVX512)
def test_without_a_compiler_the_avx2_route_is_taken_and_said(tmp_path):
    info, _ = _probe(tmp_path, "nocc", CC=str(tmp_path / "no-such-cc"))
    assert info["route"] == "avx2" and info["debug_type"] == "5"
    assert "no-such-cc" in info["error"] and "shim unavailable" in info["banner"]


def test_the_avx2_switch_selects_mkls_avx2_path_on_either_vendor(tmp_path):
    """PPCLS_FT_MKL=avx2 means MKL's AVX2 path on AMD (MKL_DEBUG_CPU_TYPE=5) and on Intel
    (MKL_ENABLE_INSTRUCTIONS=AVX2): benchmarks and tests compare the paths through it."""
    if not (AMD_AVX512 or (_cpu.cpu_vendor() == "Intel" and _cpu.has_avx512())):
        pytest.skip(f"MKL's best path here is not AVX-512 ({NOT_AMD_AVX512}; an Intel CPU needs AVX-512)")
    native, fast = _probe(tmp_path, "native")
    avx2, ref = _probe(tmp_path, "avx2", PPCLS_FT_MKL="avx2")
    assert "AVX-512" in (native["mkl"] or ""), native
    assert avx2["route"] == "avx2" and "AVX2" in avx2["banner"], avx2
    assert_mkl_took_avx2(avx2["mkl"], avx2["debug_type"])
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-3)


def test_a_users_own_mkl_setting_is_left_alone(tmp_path):
    info, _ = _probe(tmp_path, "user", MKL_DEBUG_CPU_TYPE="5")
    assert info["route"] == "user" and info["debug_type"] == "5"
    assert not (tmp_path / "cache").exists()  # nothing built or loaded


@pytest.mark.skipif(_cpu.cpu_vendor() != "Intel", reason="MKL_ENABLE_INSTRUCTIONS alone steers MKL "
                    f"on Intel CPUs only; this one is {_cpu.cpu_vendor()}")
def test_an_intel_users_own_instruction_cap_is_left_alone(tmp_path):
    info, _ = _probe(tmp_path, "user-intel", MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    assert info["route"] == "user" and "MKL_ENABLE_INSTRUCTIONS=SSE4_2" in info["banner"]
    assert "AVX" not in (info["mkl"] or ""), info["mkl"]
    info, _ = _probe(tmp_path, "user-intel-avx2", MKL_ENABLE_INSTRUCTIONS="SSE4_2", PPCLS_FT_MKL="avx2")
    assert info["route"] == "user" and "AVX" not in (info["mkl"] or "")  # theirs wins over ours


FAULTS = """
import resource, sys
import ppcls_ft
from ppcls_ft import _cpu
import paddle
print(_cpu.keep_freed_memory() if sys.argv[1] == "keep" else "not applied")
x = paddle.ones([25088, 384])  # 38 MB: above glibc's largest mmap threshold
for _ in range(6):  # the heap grows to what a step needs
    y = x + x
    del y
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = x + x
    del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode, **env):
    full = {k: v for k, v in os.environ.items() if k != "PPCLS_FT_MALLOC"}
    full.update(PYTHONPATH=str(REPO), **env)
    proc = subprocess.run([sys.executable, "-c", FAULTS, mode], env=full, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said, faults = proc.stdout.strip().splitlines()[-2:]
    return said, int(faults)


def _thp_always():
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt: glibc only")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages are 'always' here: a fresh 38 MB "
                    "block costs ~20 faults, so the count cannot tell reuse from mmap")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    said, kept = _faults("keep")
    assert "freed memory reused" in said
    _, system = _faults("system")
    # 5 adds of 38 MB: each a fresh mmap of ~9,400 pages without the setting, reused with it.
    # Reused, except that now and then a small allocation splits the freed block and one add
    # grows the heap once (seen in 4 of 10 runs, depending on the heap's layout): at most one.
    assert system > 5 * 5000 and kept < system / 3, (system, kept)
    said, _ = _faults("keep", PPCLS_FT_MALLOC="system")
    assert said == "None"


@pytest.mark.skipif(not AMD_AVX512, reason=NOT_AMD_AVX512)
def test_paddle_imported_first_takes_the_variable_route_and_says_why(tmp_path):
    full = _clean_env(tmp_path)
    code = ("import paddle, ppcls_ft, os\nfrom ppcls_ft import _cpu\n"
            "print(_cpu.STATE['route'], os.environ.get('MKL_DEBUG_CPU_TYPE'), '|', _cpu.mkl_route_text())")
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("avx2 5 |") and "paddle was imported before ppcls_ft" in line


def test_processes_launched_on_one_machine_share_its_cores(monkeypatch):
    """paddle.distributed.launch --nproc_per_node N sets PADDLE_LOCAL_SIZE=N in each process:
    each takes its share of the cores for math instead of all of them (N x oversubscribed);
    Global.cpu_threads still wins."""
    import paddle
    from ppcls_ft.utils import device

    calls = []
    monkeypatch.setattr(paddle.base.core, "set_num_threads", calls.append)
    monkeypatch.setattr(device, "available_cores", lambda: 8)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "2")
    _, banner = device.setup_device("cpu")
    assert calls == [4] and "4 math threads of 8 cores (2 training processes on this machine" in banner
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "16")  # more processes than cores: one thread each
    _, banner = device.setup_device("cpu")
    assert calls[-1] == 1 and "1 math thread of 8 cores (16 training" in banner
    _, banner = device.setup_device("cpu", cpu_threads=3)
    assert calls[-1] == 3 and "3 math threads of 8 cores," in banner
    monkeypatch.delenv("PADDLE_LOCAL_SIZE")
    _, banner = device.setup_device("cpu")
    assert calls[-1] == 8 and "8 math threads of 8 cores," in banner
