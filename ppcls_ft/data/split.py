"""Folder-per-class tree -> stratified PaddleClas lists, never splitting a picture's duplicates.

``split_folder(root, val=0.2, test=0.0, seed=0)`` lists ``root/<class>/**/<image>`` (as
``ImageFolderDataset`` does: classes are the sorted folder names), groups exact and near
duplicates (``data/check.py`` fingerprints) with a union-find, and deals whole groups, shuffled
with ``seed``, into test, val and train so that each class gets its share. Writes
``train_list.txt``, ``val_list.txt`` (``test_list.txt``) and ``label_list.txt`` into ``out``
(default ``root``), with paths relative to ``root``: set ``image_root`` to ``root``.
"""
import os
import random
from pathlib import Path

from ..errors import DataError
from .check import find_duplicates, fingerprints
from .dataset import ImageFolderDataset


def _groups(n, pairs):
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split_folder(root, val=0.2, test=0.0, seed=0, out=None, workers=None):
    """Write the lists; returns ``{split: {class name: count}}`` plus duplicate counts."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"--val {val} and --test {test}: each in [0, 1) and together below 1")
    root = Path(root)
    ds = ImageFolderDataset(str(root))
    paths = [p for p, _ in ds.samples]
    labels = [int(y) for y in ds.labels]
    prints = fingerprints(paths, workers)
    bad = [(p, err) for p, err, *_ in prints if err]
    if bad:
        shown = "\n  ".join(f"{p}: {e}" for p, e in bad[:10])
        raise DataError(f"{len(bad)} images cannot be decoded; fix or remove them first:\n  {shown}")
    index = {p: i for i, p in enumerate(paths)}
    dups = find_duplicates([("all", p, md5, ph) for p, _, _, _, md5, ph in prints])
    groups = _groups(len(paths), [(index[d["a"]], index[d["b"]]) for d in dups])
    rng = random.Random(seed)
    fractions = {"test": test, "val": val}
    assign = {}
    for c in range(len(ds.class_names)):
        mine = [g for g in groups if labels[g[0]] == c]  # a group goes with its first image's class
        mine.sort()
        rng.shuffle(mine)
        total = sum(len(g) for g in mine)
        want = {s: round(total * f) for s, f in fractions.items()}
        for g in mine:  # a duplicate group may overshoot its split's share by its extra members
            split = next((s for s in ("test", "val") if want[s] > 0), "train")
            if split != "train":
                want[split] -= len(g)
            for i in g:
                assign[i] = split
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split in ("train", "val", "test"):
        rows = [i for i in range(len(paths)) if assign[i] == split]
        if split == "test" and not test:
            continue
        lines = [f"{Path(os.path.relpath(paths[i], root)).as_posix()} {labels[i]}" for i in rows]
        (out / f"{split}_list.txt").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        summary[split] = {name: sum(1 for i in rows if labels[i] == c)
                          for c, name in enumerate(ds.class_names)}
    (out / "label_list.txt").write_text("".join(f"{c} {n}\n" for c, n in enumerate(ds.class_names)),
                                        encoding="utf-8")
    summary["duplicate_groups"] = sum(1 for g in groups if len(g) > 1)
    summary["images_in_duplicate_groups"] = sum(len(g) for g in groups if len(g) > 1)
    return summary
