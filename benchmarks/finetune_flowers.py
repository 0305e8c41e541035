"""Accuracy benchmark: fine-tuning strategies for MobileNetV2 on flowers5, one command.

    python benchmarks/finetune_flowers.py --split mini --size 128 --runs pretrained,scratch
    python benchmarks/finetune_flowers.py --split full --size 160 \
        --runs pretrained,scratch,linear_probe,freeze_unfreeze
    python benchmarks/finetune_flowers.py --split full --size 160 --runs pretrained --seeds 0,1,2

Every run is ``configs/MobileNetV2.yaml`` (the recipe users start from) with the overrides in
``RUNS`` and the dataset/size overrides below; nothing else differs between runs. Writes a results
table (markdown + JSON) and the training curves (PNG) to ``--out`` (default docs/benchmarks/).
The data and weights default to ``../shared`` (``PPCLS_FT_SHARED``).

``--seeds``: each run once per seed (``Global.seed``: the head's initial weights, the order of the
batches and every augmentation draw). On flowers5's 811 validation photos one photo is 0.12
points and the binomial spread of an accuracy near 0.92 is about 0.9 points, so a single run
cannot tell two recipes (or two kernel sets) half a point apart; the table then gives every
seed's row and a line per run with the mean, the lowest and the highest.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Strategy -> config overrides on top of configs/MobileNetV2.yaml.
RUNS = {
    "pretrained": [],
    "scratch": ["Global.pretrained_model=null"],
    # Only the head trains, so a 10x larger rate is safe and needed to move it in a few epochs.
    "linear_probe": ["FineTune.linear_probe=True", "Optimizer.lr.learning_rate=0.01"],
    # The same probe on fixed features: the train images get the eval transforms (resize, centre
    # crop), so the frozen backbone's features are computed once and cached (engine/frozen.py).
    "linear_probe_cached": ["FineTune.linear_probe=True", "Optimizer.lr.learning_rate=0.01", "FIXED_TRAIN"],
    # Head alone for one epoch, then everything at the recipe's rate.
    "freeze_unfreeze": ["FineTune.freeze_backbone_epochs=1", "FineTune.unfreeze_lr_factor=1.0"],
}


def parse_args(argv=None):
    shared = Path(os.environ.get("PPCLS_FT_SHARED", ROOT.parent / "shared"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared / "data" / "flowers5"))
    ap.add_argument("--weights", default=str(shared / "weights" / "MobileNetV2_imagenet.pdparams"))
    ap.add_argument("--split", choices=("mini", "full"), default="mini")
    ap.add_argument("--size", type=int, default=128, help="train crop / eval crop in pixels")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--runs", default="pretrained,scratch", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--seeds", default="0", help="comma list of Global.seed values; each run once per seed")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--work", default=str(ROOT / "output" / "benchmarks"))
    ap.add_argument("-o", "--override", action="append", default=[], help="extra config overrides")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other runs already in --out's results for this split and size")
    return ap.parse_args(argv)


def parse_seeds(text):
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def result_key(name, seed):
    """Seed 0 keeps the run's bare name (the key of the results written before --seeds existed),
    so ``--merge`` adds other seeds' rows beside it instead of overwriting it."""
    return name if seed == 0 else f"{name}, seed {seed}"


def run_overrides(args, name, out_dir, seed=0):
    data = Path(args.data)
    suffix = "_mini" if args.split == "mini" else ""
    resize = int(round(args.size * 256 / 224))  # the ImageNet eval ratio: resize 256 -> crop 224
    ds = "DataLoader.{}.dataset"
    out = [
        "Arch.class_num=5", "Global.device=cpu", "Global.use_visualdl=False", f"Global.seed={seed}",
        f"Global.epochs={args.epochs}", f"Global.output_dir={out_dir}", "Global.save_interval=1000",
        "Global.print_batch_step=20", f"Global.pretrained_model={args.weights}",
        f"{ds.format('Train')}.image_root={data}", f"{ds.format('Eval')}.image_root={data}",
        f"{ds.format('Train')}.cls_label_path={data / f'train_list{suffix}.txt'}",
        f"{ds.format('Eval')}.cls_label_path={data / f'val_list{suffix}.txt'}",
        f"{ds.format('Train')}.transform_ops.1.RandCropImage.size={args.size}",
        f"{ds.format('Eval')}.transform_ops.1.ResizeImage.resize_short={resize}",
        f"{ds.format('Eval')}.transform_ops.2.CropImage.size={args.size}",
        f"DataLoader.Train.sampler.batch_size={args.batch_size}",
        f"DataLoader.Train.loader.num_workers={args.workers}",
        f"DataLoader.Eval.loader.num_workers={args.workers}",
        f"Global.image_shape=[3, {args.size}, {args.size}]",
    ]
    fixed = ("DataLoader.Train.dataset.transform_ops=[{DecodeImage: {to_rgb: True, channel_first: False}}, "
             f"{{ResizeImage: {{resize_short: {resize}}}}}, {{CropImage: {{size: {args.size}}}}}, "
             "{NormalizeImage: {scale: 0.00392156862745098, mean: [0.485, 0.456, 0.406], "
             "std: [0.229, 0.224, 0.225], order: ''}}]")
    return out + [fixed if o == "FIXED_TRAIN" else o for o in RUNS[name]] + args.override


def main(argv=None):
    args = parse_args(argv)
    from ppcls_ft.config import load_config
    from ppcls_ft.engine.run import train

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"flowers5_{args.split}_{args.size}px"
    seeds = parse_seeds(args.seeds)
    results = {}
    previous = out / f"{tag}.json"
    if args.merge and previous.is_file():
        results = json.loads(previous.read_text())["results"]
    for name, seed in [(n, s) for n in names for s in seeds]:
        key = result_key(name, seed)
        cfg = load_config(ROOT / "configs" / "MobileNetV2.yaml",
                          run_overrides(args, name, work / key.replace(", seed ", "_seed"), seed))
        start = time.time()
        res = train(cfg)
        hist = res["history"]
        results[key] = {
            "run": name, "seed": seed, "best_top1": res["best_top1"],
            "final_top1": hist[-1].get("eval_top1") if hist else None,
            "epochs": len(hist), "minutes": round((time.time() - start) / 60, 2),
            "images_per_sec": round(sum(h["images_per_sec"] for h in hist) / max(len(hist), 1), 1),
            # every image trained on over the whole training time (a cached epoch is near-free,
            # so the mean of per-epoch rates would overstate it)
            "overall_images_per_sec": round(sum(h["images_per_sec"] * h["seconds"] for h in hist)
                                            / max(sum(h["seconds"] for h in hist), 1e-9), 1),
            "minutes_to_090": next((round(h["elapsed_seconds"] / 60, 2) for h in hist
                                    if (h.get("eval_top1") or 0) >= 0.90), None),
            "verdict": res["diagnosis"]["verdict"], "history": hist,
        }
        print(f"== {key}: best top-1 {res['best_top1']:.4f} in {results[key]['minutes']} min", flush=True)
    order = list(RUNS)  # table order: RUNS order, then seed order
    results = dict(sorted(results.items(), key=lambda kv: (
        order.index(kv[1].get("run", kv[0])), kv[1].get("seed", 0))))
    (out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    table = write_table(out / f"{tag}.md", tag, args, results)
    plot_curves(out / f"{tag}.png", tag, results)
    print(table)
    return results


def write_table(path, tag, args, results):
    from ppcls_ft.utils.device import available_cores
    runs = list(dict.fromkeys(r.get("run", key) for key, r in results.items()))
    seeds = sorted({r.get("seed", 0) for r in results.values()})
    seeds = f" --seeds {','.join(map(str, seeds))}" if seeds != [0] else ""
    lines = [f"# {tag}: MobileNetV2 fine-tuning strategies", "",
             f"`python benchmarks/finetune_flowers.py --split {args.split} --size {args.size} "
             f"--epochs {args.epochs} --runs {','.join(runs)}{seeds}` — configs/MobileNetV2.yaml, batch "
             f"{args.batch_size}, CPU with {available_cores()} cores, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| run | seed | best val top-1 | final val top-1 | epochs | minutes | minutes to 0.90 "
             "| train images/s (all epochs) | RSS after each epoch (MiB) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results.items():
        final = "—" if r["final_top1"] is None else f"{r['final_top1']:.4f}"
        to90 = r.get("minutes_to_090")
        rss = [h.get("rss_mib") for h in r["history"]]
        rss = ", ".join(f"{v:.0f}" for v in rss) if rss and None not in rss else "—"
        lines.append(f"| {r.get('run', key)} | {r.get('seed', 0)} | {r['best_top1']:.4f} | {final} | "
                     f"{r['epochs']} | {r['minutes']} | "
                     f"{'—' if to90 is None else to90} | {r.get('overall_images_per_sec', r['images_per_sec'])} "
                     f"| {rss} | {r['verdict']} |")
    lines += [""] + seed_summary(results)
    lines += ["", f"![curves]({path.with_suffix('.png').name})", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def seed_summary(results):
    """A line per run measured with several seeds: mean, lowest and highest of its top-1s."""
    groups = {}
    for key, r in results.items():
        groups.setdefault(r.get("run", key), []).append(r)
    lines = []
    for name, rs in groups.items():
        if len(rs) < 2:
            continue
        best, final = [r["best_top1"] for r in rs], [r["final_top1"] or 0.0 for r in rs]
        to90 = [r.get("minutes_to_090") for r in rs]
        reached = [m for m in to90 if m is not None]

        def spread(v):
            return f"mean {sum(v) / len(v):.4f} (lowest {min(v):.4f}, highest {max(v):.4f})"
        lines.append(f"- **{name}** over seeds {', '.join(str(r['seed']) for r in rs)}: best val top-1 "
                     f"{spread(best)}; final {spread(final)}; 0.90 reached in {len(reached)} of "
                     f"{len(rs)}" + (f", at most {max(reached)} minutes" if reached else "") + ".")
    return lines


def plot_curves(path, tag, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, r in results.items():
        epochs = [h["epoch"] for h in r["history"]]
        ax1.plot(epochs, [h.get("eval_top1") for h in r["history"]], marker="o", label=key)
        ax2.plot(epochs, [h["train_loss"] for h in r["history"]], marker="o", label=key)
    ax1.set(title=f"{tag}: val top-1", xlabel="epoch", ylabel="top-1")
    ax2.set(title="train loss", xlabel="epoch", ylabel="loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
