"""Check a dataset before training: counts, unreadable and tiny images, duplicates and leakage.

``check_dataset(cfg)`` reads ``DataLoader.Train`` and ``DataLoader.Eval`` exactly as training
does (the same dataset classes, list parsing and image decoder), then fingerprints every image:

- ``exact``: the same decoded pixels (an MD5 of the pixel buffer and its shape), whatever the file;
- ``near``: the same picture re-encoded, resized or slightly edited: a 64-bit perceptual hash
  (DCT of a 32x32 grey thumbnail, the 8x8 lowest frequencies against their median) no more than
  ``NEAR_BITS`` bits apart. Why by hand: no package in our dependencies computes one, and it is
  twenty lines of OpenCV.

Duplicates across Train and Eval are leakage: the val accuracy of a small dataset then measures
memory. Decoding runs in a process pool over all cores; a few thousand photos take seconds.
"""
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

NEAR_BITS = 6        # perceptual hashes this close are the same picture (of 64 bits)
TINY_PX = 32         # a shorter side below this is reported as tiny
IMBALANCE = 3.0      # largest / smallest class count above this is called imbalanced
FEW_PER_CLASS = 20   # training images per class below this is called few


def fingerprint(path):
    """``(path, error or None, height, width, md5 of pixels, perceptual hash as int)``."""
    from .transforms import DecodeImage
    try:
        with open(path, "rb") as f:
            img = DecodeImage(to_rgb=False)(f.read())
    except Exception as exc:  # noqa: BLE001  (any failure is a finding, reported per file)
        return path, f"{type(exc).__name__}: {exc}", 0, 0, None, None
    h, w = img.shape[:2]
    md5 = hashlib.md5(np.ascontiguousarray(img).tobytes() + str(img.shape).encode()).hexdigest()
    return path, None, h, w, md5, phash(img)


def phash(img):
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return int(np.packbits(bits).view(">u8")[0])


def fingerprints(paths, workers=None):
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    if workers == 1 or len(paths) < 64:
        return [fingerprint(p) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fingerprint, paths, chunksize=32))


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def near_pairs(hashes, max_bits=NEAR_BITS, block=512):
    """Index pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in at most ``max_bits``."""
    h = np.asarray(hashes, np.uint64)
    out = []
    for start in range(0, len(h), block):
        x = h[start:start + block, None] ^ h[None, :]
        dist = _POPCOUNT[x.view(np.uint8)].reshape(x.shape + (8,)).sum(axis=-1)
        rows, cols = np.nonzero(dist <= max_bits)
        keep = cols > rows + start
        out += list(zip((rows[keep] + start).tolist(), cols[keep].tolist()))
    return out


def find_duplicates(items):
    """``items``: ``[(split, path, md5, phash)]`` -> ``[{a, b, split_a, split_b, kind}]``."""
    found = []
    by_md5 = {}
    for split, path, md5, _ in items:
        if md5 in by_md5:
            s0, p0 = by_md5[md5]
            found.append({"a": p0, "b": path, "split_a": s0, "split_b": split, "kind": "exact"})
        else:
            by_md5[md5] = (split, path)
    exact = {(d["a"], d["b"]) for d in found} | {(d["b"], d["a"]) for d in found}
    for i, j in near_pairs([it[3] for it in items]):
        (sa, pa, ma, _), (sb, pb, mb, _) = items[i], items[j]
        if ma != mb and (pa, pb) not in exact:
            found.append({"a": pa, "b": pb, "split_a": sa, "split_b": sb, "kind": "near"})
    return found


def _split_report(dataset, prints, class_num, tiny_px):
    counts = np.bincount(dataset.labels, minlength=class_num).tolist() if len(dataset.labels) else [0] * class_num
    return {"samples": len(dataset.samples),
            "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
            "unreadable": [{"path": p, "reason": err} for p, err, *_ in prints if err],
            "tiny": [p for p, err, h, w, *_ in prints if not err and min(h, w) < tiny_px],
            "sizes": [[h, w] for _, err, h, w, *_ in prints if not err]}


def verdict(report, class_num):
    """``(verdict, advice list)`` from a report (``check_dataset``'s)."""
    advice, problems = [], []
    train = report["splits"].get("Train")
    if train is not None:
        counts = [v for v in train["class_counts"].values()]
        readable = train["samples"] - len(train["unreadable"])
        if readable == 0:
            return "cannot train", ["no readable training image: fix DataLoader.Train.dataset"]
        empty = [c for c, v in train["class_counts"].items() if v == 0]
        if empty:
            problems.append("classes without training images")
            advice.append(f"classes {', '.join(empty[:10])} have no training image: add some, or "
                          "lower Arch.class_num / relabel")
        present = [v for v in counts if v > 0]
        if present and max(present) > IMBALANCE * min(present):
            problems.append("imbalanced")
            advice.append(f"classes range from {min(present)} to {max(present)} training images: "
                          "use Loss.Train.0.CELoss.class_weight: auto or sampler name "
                          "ClassBalancedSampler")
        if present and min(present) < FEW_PER_CLASS:
            problems.append("few images per class")
            advice.append(f"a class has only {min(present)} training images: prefer "
                          "FineTune.linear_probe or freeze_backbone_epochs, and strong augmentation")
    leaks = [d for d in report["duplicates"] if d["split_a"] != d["split_b"]]
    if leaks:
        problems.append("train/val leakage")
        advice.append(f"{len(leaks)} val images duplicate training images: remove them from the val "
                      "list (or re-split with tools/split_dataset.py, which keeps duplicates on one side)")
    inner = len(report["duplicates"]) - len(leaks)
    if inner:
        advice.append(f"{inner} duplicate pairs within a split: they weigh double in training or eval")
    for name, split in report["splits"].items():
        if split["unreadable"]:
            problems.append(f"unreadable {name} images")
            advice.append(f"{len(split['unreadable'])} {name} images cannot be decoded (skipped in "
                          "training): re-export or remove them")
        if split["tiny"]:
            advice.append(f"{len(split['tiny'])} {name} images are under {report['tiny_below_px']} px "
                          "on their short side")
    return ("ok" if not problems else ", ".join(problems)), advice


def check_dataset(cfg, tiny_px=TINY_PX, workers=None):
    """The report dict (also what ``tools/check_dataset.py`` writes to check_dataset.json)."""
    from .loader import _build_dataset
    class_num = int(cfg["Arch"]["class_num"])
    splits, items = {}, []
    for name in ("Train", "Eval"):
        section = (cfg.get("DataLoader") or {}).get(name)
        if not section:
            continue
        dataset = _build_dataset(section["dataset"], class_num, f"DataLoader.{name}.dataset")
        prints = fingerprints([str(p) for p, _ in dataset.samples], workers)
        splits[name] = _split_report(dataset, prints, class_num, tiny_px)
        items += [(name, p, md5, ph) for p, err, _, _, md5, ph in prints if not err]
    report = {"splits": splits, "tiny_below_px": tiny_px, "near_duplicate_bits": NEAR_BITS,
              "duplicates": find_duplicates(items)}
    report["verdict"], report["advice"] = verdict(report, class_num)
    return report


def write_check(report, out_dir, class_names=None):
    """check_dataset.json, class_histogram.png, image_sizes.png; returns the JSON path."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    sizes = {k: v.pop("sizes") for k, v in report["splits"].items()}
    path = os.path.join(out_dir, "check_dataset.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    _plots(report, sizes, out_dir, class_names)
    return path


def _plots(report, sizes, out_dir, class_names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(next(iter(report["splits"].values()))
                                                       ["class_counts"])), 4))
    width = 0.8 / max(1, len(report["splits"]))
    for i, (name, split) in enumerate(report["splits"].items()):
        ids = [int(c) for c in split["class_counts"]]
        ax.bar(np.array(ids) + i * width, list(split["class_counts"].values()), width, label=name)
        if class_names and len(ids) <= 40:
            ax.set_xticks(np.array(ids) + width / 2, [class_names[c] for c in ids], rotation=60,
                          ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("images per class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "class_histogram.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, hw in sizes.items():
        if hw:
            a = np.array(hw)
            ax.scatter(a[:, 1], a[:, 0], s=6, alpha=0.5, label=name)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("image sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "image_sizes.png"), dpi=100)
    plt.close(fig)
