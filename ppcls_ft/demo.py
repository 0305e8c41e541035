"""An embedded demo dataset: procedurally drawn patterns, so ``make demo`` needs no download.

Four texture classes (horizontal stripes, vertical stripes, checkerboard, rings) in random colour
pairs, periods and phases with pixel noise, written as JPEGs in the PaddleClas list format with a
label list. Colour carries no information, so the network must learn spatial structure; a small
network does that from scratch in a couple of CPU minutes, which exercises the whole pipeline
(decode, augment, train, evaluate, checkpoint, export, serve) on real image files. (Geometric
shapes were tried first: from scratch they stay near chance for 15 epochs on this budget.)
"""
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("horizontal_stripes", "vertical_stripes", "checkerboard", "rings")


def _draw(kind, size, rng):
    """One image of ``kind``: two random, clearly different colours, random period and phase."""
    c0 = rng.integers(0, 256, 3)
    c1 = (c0 + rng.integers(80, 176, 3)) % 256
    period = rng.uniform(6, 16)  # pixels per light+dark cycle
    phase = rng.uniform(0, period)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "horizontal_stripes":
        on = ((yy + phase) % period) < period / 2
    elif kind == "vertical_stripes":
        on = ((xx + phase) % period) < period / 2
    elif kind == "checkerboard":
        on = (((yy + phase) % period) < period / 2) ^ (((xx + phase) % period) < period / 2)
    else:
        cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
        on = (np.hypot(yy - cy, xx - cx) + phase) % period < period / 2
    img = np.where(on[..., None], c1, c0).astype(np.float64)
    img += rng.normal(0, 10, img.shape)  # sensor-like noise so no two images are alike
    return np.clip(img, 0, 255).astype(np.uint8)


def make_demo_dataset(root, train_per_class=100, val_per_class=25, size=64, seed=0):
    """Write the dataset under ``root``; returns ``root``. Re-running with the same args is a no-op."""
    root = Path(root)
    marker = root / f".complete_{train_per_class}_{val_per_class}_{size}_{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        lines = []
        for label, kind in enumerate(CLASSES):
            folder = root / "images" / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rel = f"images/{split}/{kind}/{i:04d}.jpg"
                cv2.imwrite(str(root / rel), _draw(kind, size, rng), [cv2.IMWRITE_JPEG_QUALITY, 92])
                lines.append(f"{rel} {label}")
        (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    (root / "label_list.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(CLASSES)))
    marker.touch()
    return root
