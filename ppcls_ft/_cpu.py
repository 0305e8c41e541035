"""CPU fast-path environment that must be set before Paddle loads its math library.

Paddle 3.3.1 bundles MKL 2019, which takes a generic (3x slower) code path on AMD CPUs unless
``MKL_DEBUG_CPU_TYPE=5`` is in the environment when MKL loads (shared/guide/PERFORMANCE.md:
ResNet50 training 1.27 -> 2.93 images/s on a 2-core EPYC). It is harmless on Intel. This module
imports nothing heavy so ``ppcls_ft/__init__.py`` can run it before anything imports paddle.
"""
import os


def cpu_vendor():
    """'AMD', 'Intel' or 'unknown', read from /proc/cpuinfo (Linux) without importing paddle."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return "unknown"
    if "AuthenticAMD" in head:
        return "AMD"
    if "GenuineIntel" in head:
        return "Intel"
    return "unknown"


def prepare_cpu_env():
    """Select MKL's AVX2 path on AMD unless the user already chose; returns what was decided."""
    vendor = cpu_vendor()
    if vendor == "AMD" and "MKL_DEBUG_CPU_TYPE" not in os.environ:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return vendor
