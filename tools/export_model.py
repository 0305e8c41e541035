"""Export a trained model for deployment (PaddleClas command line).

    python tools/export_model.py -c configs/X.yaml \
        -o Global.pretrained_model=output/best_model -o Global.save_inference_dir=./inference

Writes inference.json + inference.pdiparams + inference.yml + export_certificate.json (see
docs/deploy.md). -o Export.calibrate=True fits a temperature on DataLoader.Eval.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from ppcls_ft.engine.cli import run_cli  # noqa: E402

OPTIONS = {"--allow-random": {"action": "store_true",
                              "help": "export untrained weights when Global.pretrained_model is not set"}}


def export(cfg, allow_random):
    from ppcls_ft.engine.export import export_inference_model

    import json

    from ppcls_ft.inference_format import CERTIFICATE_FILE, read_spec

    out = export_inference_model(cfg, allow_random=allow_random)
    cert = json.loads((out / CERTIFICATE_FILE).read_text())
    print(f"exported inference model to {out}")
    print(f"certificate: {cert['inputs']}; top-1 agreement {cert['top1_agreement']:.4f}, largest "
          f"probability difference {cert['max_abs_prob_diff']:.2e} (tolerance "
          f"{cert['tolerance']['max_abs_prob_diff']:g})")
    cal = read_spec(out).calibration
    if cal:
        print(f"calibration: temperature {read_spec(out).temperature:.3f}; ECE ({cal['ece_bins']} bins) "
              f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (held-out halves: "
              f"{cal['ece_after_crossfit']:.4f}); NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}")
    return out


def main(argv=None):
    return run_cli(__doc__.splitlines()[0], export, argv, options=OPTIONS)


if __name__ == "__main__":
    main()
