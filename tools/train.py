"""Fine-tune a classifier: python tools/train.py -c configs/SwinT_base.yaml -o Arch.class_num=5"""
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from ppcls_ft.engine.cli import run_cli  # noqa: E402


def main():
    from ppcls_ft.engine.run import train
    result = run_cli(__doc__, train)
    if result["stopped_by"]:  # 128 + signal number: what a shell reports for a killed job
        sys.exit(128 + signal.Signals.__members__.get(result["stopped_by"], signal.SIGTERM))
    sys.exit(3 if result["diverged_at"] else 0)


if __name__ == "__main__":
    main()
