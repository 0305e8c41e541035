"""Export a trained model for deployment (PaddleClas command line).

    python tools/export_model.py -c configs/X.yaml \
        -o Global.pretrained_model=output/best_model -o Global.save_inference_dir=./inference

Writes inference.json + inference.pdiparams + inference.yml (see docs/deploy.md).
"""
import argparse
import os
import sys

try:
    import ppcls_ft
except ImportError:  # run from a checkout without installing: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ppcls_ft

from ppcls_ft.engine.export import export_inference_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="training config YAML")
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="Section.key=value (parsed as YAML), repeatable")
    parser.add_argument("--allow-random", action="store_true",
                        help="export untrained weights when Global.pretrained_model is not set")
    args = parser.parse_args(argv)
    cfg = ppcls_ft.load_config(args.config, args.override)
    out = export_inference_model(cfg, allow_random=args.allow_random)
    print(f"exported inference model to {out}")


if __name__ == "__main__":
    main()
