"""An embedded demo dataset: procedurally drawn shapes, so ``make demo`` needs no download.

Four classes (circle, square, triangle, cross) in random colours, sizes, positions and
backgrounds with noise, written as JPEGs in the PaddleClas list format with a label list. A small
network learns them in a couple of CPU minutes, which exercises the whole pipeline (decode,
augment, train, evaluate, checkpoint, export) on real image files.
"""
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")


def _draw(kind, size, rng):
    bg = rng.integers(0, 256, 3)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    fg = (bg + rng.integers(96, 160, 3)) % 256  # always clearly different from the background
    color = tuple(int(c) for c in fg)
    r = int(rng.uniform(0.22, 0.38) * size)
    cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
    elif kind == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    elif kind == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    else:
        t = max(2, r // 3)
        cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), color, -1)
        cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), color, -1)
    noise = rng.normal(0, 12, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_demo_dataset(root, train_per_class=60, val_per_class=20, size=64, seed=0):
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
