"""Classify images with an exported model through paddle-inference (PaddleClas deploy command line).

    python deploy/python/predict_cls.py -c deploy/configs/inference_cls.yaml \
        -o Global.inference_model_dir=./inference -o Global.infer_imgs=./images

Works from any working directory. All logic lives in ppcls_ft/predictor.py, so this script and
the library share one preprocessing implementation (PaddleClas keeps a second copy in deploy/).
"""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent.parent
if (_ROOT / "ppcls_ft").is_dir():  # in a checkout: its own library, not another installed copy
    sys.path.insert(0, str(_ROOT))

from ppcls_ft.engine.cli import run_cli  # noqa: E402


def main(argv=None):
    from ppcls_ft.predictor import load_deploy_config, run_deploy

    return run_cli(__doc__.splitlines()[0], run_deploy, argv, load=load_deploy_config)


if __name__ == "__main__":
    main()
