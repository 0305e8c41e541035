"""Export a trained model for deployment (PaddleClas command line).

    python tools/export_model.py -c configs/X.yaml \
        -o Global.pretrained_model=output/best_model -o Global.save_inference_dir=./inference

Writes inference.json + inference.pdiparams + inference.yml (see docs/deploy.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from ppcls_ft.engine.cli import run_cli  # noqa: E402

OPTIONS = {"--allow-random": {"action": "store_true",
                              "help": "export untrained weights when Global.pretrained_model is not set"}}


def export(cfg, allow_random):
    from ppcls_ft.engine.export import export_inference_model

    out = export_inference_model(cfg, allow_random=allow_random)
    print(f"exported inference model to {out}")
    return out


def main(argv=None):
    return run_cli(__doc__.splitlines()[0], export, argv, options=OPTIONS)


if __name__ == "__main__":
    main()
