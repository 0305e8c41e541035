"""Honest scores on real photos: fine-tune MobileNetV2 on flowers5, export it with
``Export.calibrate=True``, and report the export certificate and ECE before/after.

    python benchmarks/calibrate_flowers.py                    # linear probe, mini split, 128 px
    python benchmarks/calibrate_flowers.py --run pretrained --epochs 5

Training uses benchmarks/finetune_flowers.py's overrides (the same recipe); the export certifies
and calibrates on the FULL val split (811 photos) whatever the training split, so the figures
are not measured on 100 images. Writes docs/benchmarks/calibration_flowers5.md; the exported
model stays in --work for benchmarks/serve_load.py --model_dir.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None):
    import finetune_flowers as ff

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="linear_probe", choices=list(ff.RUNS))
    ap.add_argument("--split", default="mini", choices=("mini", "full"))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--work", default=str(ROOT / "output" / "calibrate_flowers"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "calibration_flowers5.md"))
    args = ap.parse_args(argv)
    ft_args = ff.parse_args(["--split", args.split, "--size", str(args.size), "--epochs",
                             str(args.epochs), "--workers", "0"])

    from ppcls_ft.config import load_config
    from ppcls_ft.engine.export import export_inference_model
    from ppcls_ft.engine.run import train
    from ppcls_ft.inference_format import CERTIFICATE_FILE, read_spec

    work = Path(args.work)
    overrides = ff.run_overrides(ft_args, args.run, work)
    cfg = load_config(ROOT / "configs" / "MobileNetV2.yaml", overrides)
    t0 = time.time()
    result = train(cfg)
    minutes = (time.time() - t0) / 60
    data = Path(ft_args.data)
    export_overrides = overrides + [
        f"Global.pretrained_model={work / args.run / 'best_model'}",
        f"Global.save_inference_dir={work / 'inference'}",
        f"DataLoader.Eval.dataset.cls_label_path={data / 'val_list.txt'}",
        f"Infer.PostProcess.class_id_map_file={data / 'label_list.txt'}",
        f"Infer.transforms.1.ResizeImage.resize_short={int(round(args.size * 256 / 224))}",
        f"Infer.transforms.2.CropImage.size={args.size}",
        "Export.calibrate=True"]
    t0 = time.time()
    out = export_inference_model(load_config(ROOT / "configs" / "MobileNetV2.yaml", export_overrides))
    export_s = time.time() - t0
    cert = json.loads((out / CERTIFICATE_FILE).read_text())
    spec = read_spec(out)
    cal = spec.calibration
    cmd = "python benchmarks/calibrate_flowers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Calibration and export certificate on flowers5", "",
        f"`{cmd.strip()}` on {time.strftime('%Y-%m-%d')}: MobileNetV2 (ImageNet weights), run "
        f"`{args.run}` of benchmarks/finetune_flowers.py, trained on the {args.split} split at "
        f"{args.size} px for {args.epochs} epochs ({minutes:.1f} min, best val top-1 "
        f"{result['best_top1']:.4f} on the training run's val list), then exported with "
        f"`Export.calibrate=True`; certificate and calibration on {cert['inputs']} "
        f"(export {export_s:.0f} s).", "",
        "| | value |", "| --- | ---: |",
        f"| val top-1 (dygraph) | {cal['top1']:.4f} |",
        f"| fitted temperature T | {spec.temperature:.3f} |",
        f"| ECE, {cal['ece_bins']} bins, before | {cal['ece_before']:.4f} |",
        f"| ECE after (T fitted on the same images) | {cal['ece_after']:.4f} |",
        f"| ECE after, cross-fitted halves | {cal['ece_after_crossfit']:.4f} |",
        f"| NLL before / after | {cal['nll_before']:.4f} / {cal['nll_after']:.4f} |",
        f"| certificate: images | {cert['samples']} |",
        f"| certificate: top-1 agreement | {cert['top1_agreement']:.4f} ({cert['top1_disagreements']} differ) |",
        f"| certificate: largest probability difference | {cert['max_abs_prob_diff']:.2e} (tolerance {cert['tolerance']['max_abs_prob_diff']:g}) |",
        "",
        (f"T = {spec.temperature:.2f} > 1: the raw scores were over-confident and are softened."
         if spec.temperature > 1 else
         f"T = {spec.temperature:.2f} < 1: the raw scores were under-confident (the recipe's label "
         "smoothing, CELoss epsilon 0.1, pulls them down) and are sharpened.")
        + " ECE after on the fitting images is optimistic; the cross-fitted figure scores each "
        "half with the T fitted on the other half. The val list of training (mini: 100 photos, 20 "
        "per class) and the full val split (811, classes as in the data) give different top-1.", ""]
    text = "\n".join(lines)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
