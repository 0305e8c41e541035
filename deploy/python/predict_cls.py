"""Classify images with an exported model through paddle-inference (PaddleClas deploy command line).

    python deploy/python/predict_cls.py -c deploy/configs/inference_cls.yaml \
        -o Global.inference_model_dir=./inference -o Global.infer_imgs=./images

Works from any working directory. All logic lives in ppcls_ft/predictor.py, so this script and
the library share one preprocessing implementation (PaddleClas keeps a second copy in deploy/).
"""
import argparse
import os
import sys

try:
    import ppcls_ft  # noqa: F401  (installed, or already on the path)
except ImportError:  # a plain checkout: the repository root is two levels up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ppcls_ft.predictor import load_deploy_config, run_deploy  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="deploy YAML, e.g. deploy/configs/inference_cls.yaml")
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="Section.key=value (parsed as YAML), repeatable")
    args = parser.parse_args(argv)
    run_deploy(load_deploy_config(args.config, args.override))


if __name__ == "__main__":
    main()
