"""Pick the device, use every CPU core for math, and say so at start-up.

Paddle runs one math thread by default (shared/guide/PERFORMANCE.md §1: ResNet50 training
0.84 -> 1.27 images/s with 2 threads, 2.93 with the MKL AVX2 path on AMD), and PaddleClas never
changes it. We set ``paddle.base.core.set_num_threads`` to the cores this process may use, shared
out among the training processes ``paddle.distributed.launch`` started on this machine.
"""
import os

import paddle

from .. import CPU_VENDOR
from .._cpu import cpuinfo_line


def available_cores():
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes():
    """Training processes on this machine: ``paddle.distributed.launch`` sets PADDLE_LOCAL_SIZE in
    each (``--nproc_per_node``); 1 when it is absent or unreadable."""
    try:
        return max(1, int(os.environ.get("PADDLE_LOCAL_SIZE") or 1))
    except ValueError:
        return 1


def math_threads(cores, processes):
    """Math threads for one of ``processes`` training processes sharing ``cores``: an equal share,
    at least one. Every process taking every core oversubscribes them, and Paddle's OpenMP
    threads wait for each other by spinning (libiomp5's default), so a thread that lost its
    core holds up its whole team."""
    return max(1, cores // max(1, processes))


def cpu_simd():
    """The widest x86 vector extension the CPU reports: 'avx512', 'avx2', 'avx' or 'none'."""
    flags = cpuinfo_line("flags")
    if flags is None:
        return "unknown"
    for name in ("avx512f", "avx2", "avx"):
        if f" {name}" in flags:
            return name.replace("f", "") if name == "avx512f" else name
    return "none"


def rss_mib():
    """This process's resident memory in MiB (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        return None


def copying_transposes():
    """Make ``transpose`` (and slicing) copy at once on the CPU instead of returning a strided
    view; returns a phrase for the banner, or None when the user set the flag.

    Paddle 3's dygraph returns views, and the next ``reshape``/``matmul`` makes them contiguous
    with a generic element-by-element strided copy, while its transpose kernel copies in blocks.
    A Swin-T training step spent a quarter of its time in those copies (forward and backward):
    FLAGS_use_stride_kernel=0 trains it 1.6x faster (1.53 -> 2.42 images/s, bs 8, 2 cores),
    the CNNs unchanged (docs/benchmarks/train_speed.md). Values are the same (views and copies
    hold the same numbers; tests/test_models_swin.py compares the gradients). Process-wide, like
    every Paddle flag; the user's own ``FLAGS_use_stride_kernel`` wins."""
    if "FLAGS_use_stride_kernel" in os.environ:
        return None
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    return "copying transposes (FLAGS_use_stride_kernel=0)"


def gpu_available():
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def setup_device(device="cpu", cpu_threads=None, logger=None):
    """Set Paddle's device and math threads; returns ``(device_str, banner)``.

    ``device: gpu`` without a usable GPU falls back to the CPU with a warning, so the PaddleClas
    configs (all written for GPUs) run anywhere.
    """
    device = (device or "cpu").lower()
    notes = []
    if device.startswith("gpu"):
        if gpu_available():
            # Plain "gpu": Paddle picks FLAGS_selected_gpus, which paddle.distributed.launch sets
            # to each process's own card.
            paddle.set_device("gpu")
            place = paddle.device.get_device()
            banner = f"device {place} ({paddle.device.cuda.get_device_name()})"
            _log(logger, banner)
            return "gpu", banner
        notes.append("Global.device is gpu but this Paddle has no usable GPU; training on the CPU")
        device = "cpu"
    elif device != "cpu":
        notes.append(f"Global.device {device!r} is not supported here; training on the CPU")
        device = "cpu"
    paddle.set_device("cpu")
    cores = available_cores()
    processes = local_processes()
    threads = int(cpu_threads or math_threads(cores, processes))
    paddle.base.core.set_num_threads(threads)
    from .._cpu import keep_freed_memory, mkl_route_text
    fast = mkl_route_text()
    heap = keep_freed_memory()
    if heap:
        fast += f", {heap}"
    layout = copying_transposes()
    if layout:
        fast += f", {layout}"
    from .. import kernels
    share = (f" ({processes} training processes on this machine share them)"
             if processes > 1 and not cpu_threads else "")
    banner = (f"device cpu: {threads} math thread{'s' if threads != 1 else ''} of {cores} "
              f"cores{share}, {CPU_VENDOR} CPU with "
              f"{cpu_simd()}, {fast}, {kernels.status()}")
    for note in notes:
        _log(logger, note, warning=True)
    _log(logger, banner)
    return "cpu", banner


def _log(logger, msg, warning=False):
    if logger is None:
        print(msg)
    elif warning:
        logger.warning(msg)
    else:
        logger.info(msg)
