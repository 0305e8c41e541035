"""Check the GPU paths on a machine that has GPUs: AMP O1/O2 train + eval + export on one GPU,
and N-GPU data parallel against one GPU with N times the batch.

    python tools/check_gpu.py                 # 1 GPU checks, plus 2-GPU exactness if 2+ GPUs
    python tools/check_gpu.py --gpus 0,1,2,3  # exactness over these four
    python tools/check_gpu.py --device cpu    # the same checks on the CPU (bfloat16, 2 processes)

Prints one line per check and exits 1 if any fails. Work files go to --workdir (a temp folder).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--gpus", default=None, help="devices for the exactness check, e.g. 0,1")
    parser.add_argument("--only", choices=("amp", "exact"), default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    from ppcls_ft.selfcheck import check_amp, check_exact
    from ppcls_ft.utils.device import gpu_available

    if args.device == "gpu" and not gpu_available():
        print("error: no usable GPU in this Paddle build; run with --device cpu to check the CPU "
              "twins of these paths", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppcls_ft_check_"))
    checks = []
    if args.only in (None, "amp"):
        for level in ("O1", "O2"):
            checks.append((f"AMP {level} train+eval+export", lambda lv=level: check_amp(work, args.device, lv)))
    if args.only in (None, "exact"):
        devices = args.gpus
        if args.device == "gpu" and devices is None:
            import paddle
            count = paddle.device.cuda.device_count()
            devices = ",".join(map(str, range(min(count, 2)))) if count >= 2 else None
        n = len(devices.split(",")) if devices else (2 if args.device == "cpu" else 0)
        if n >= 2:
            checks.append((f"{n}-device data parallel == 1 device x {n} batch",
                           lambda: check_exact(work, args.device, n, devices if args.device == "gpu" else None)))
        else:
            print("skip: exactness needs 2+ GPUs (this machine has fewer)")
    failed = 0
    for name, run in checks:
        ok, figures = run()
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {json.dumps(figures, default=str)}")
    print(f"{len(checks) - failed} passed, {failed} failed (work files in {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
