"""Top-k predictions: python tools/infer.py -c CONFIG -o Infer.infer_imgs=IMG_OR_DIR
-o Global.pretrained_model=output/best_model"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from ppcls_ft.engine.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    from ppcls_ft.engine.run import infer
    run_cli(__doc__, infer)
