"""Datasets: PaddleClas list format (``ImageNetDataset``) and folder-per-class (``ImageFolderDataset``).

Both validate every sample at construction (file exists, label is an integer in range), so a bad
list fails at start-up with ``train_list.txt:17: ...`` instead of hours into training. An item is
``(image float32 CHW, label int64)``. A corrupt image at run time is not fatal: it is logged once
and the item is ``None``; ``collate_skip_none`` drops it and counts it in the batch.
"""
import logging
import os
from typing import Optional

import numpy as np
import paddle

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from .transforms import Compose, build_transforms

logger = logging.getLogger(__name__)

_MAX_REPORTED = 10  # problems listed in one DataError before "... and N more"
_IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"]


def _raise_problems(problems, advice):
    if problems:
        shown = problems[:_MAX_REPORTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError("\n  ".join(shown) + more
                        + f"\n({len(problems)} bad sample(s)) {advice}")


class _ImageDataset(paddle.io.Dataset):
    """Shared part: ``samples`` [(abs path, label)], transform, item loading, class counts."""

    class_names = None  # list of names (label i -> class_names[i]) when the layout provides them

    def _setup(self, samples, transform_ops, class_num):
        self.samples = samples
        self.labels = np.asarray([s[1] for s in samples], dtype=np.int64)
        self.class_num = class_num
        self.transform = (transform_ops if isinstance(transform_ops, Compose)
                          else build_transforms(transform_ops or [{"DecodeImage": None}],
                                                "transform_ops"))
        self._warned = set()  # paths already reported as unreadable (per process)

    def __len__(self):
        return len(self.samples)

    def class_counts(self, class_num: Optional[int] = None):
        """Samples per class as int64 [K]; K = class_num, else the builder's, else max label + 1."""
        k = class_num or self.class_num or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        return np.bincount(self.labels, minlength=k).astype(np.int64)

    def _load(self, path):
        with open(path, "rb") as f:
            data = f.read()
        return self.transform.to_chw(data)

    def __getitem__(self, idx):
        path, label = self.samples[idx]
        try:
            img = self._load(path)
        except (OSError, DataError) as e:  # unreadable or undecodable file: skip, do not crash
            if path not in self._warned:
                self._warned.add(path)
                logger.warning("skipping unreadable image %s: %s", path, e)
            return None
        return img, np.int64(label)


def _read_lines(list_path):
    """The lines of a list file: UTF-8, with or without the BOM Windows editors put first
    (``utf-8-sig``), LF or CRLF endings (text mode folds them). Other encodings (GBK lists from
    Chinese Windows) are refused by line, rather than read as wrong paths."""
    with open(list_path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        lineno = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{list_path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                        f"offset {exc.start}); re-save the list as UTF-8, e.g. "
                        f"iconv -f GBK -t UTF-8 {os.path.basename(list_path)}") from None


def _parse_label(text):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return None


@DATASETS.register
class ImageNetDataset(_ImageDataset):
    """PaddleClas list format: one ``relative/path.jpg <int label>`` per line.

    YAML::

        dataset:
          name: ImageNetDataset
          image_root: ./dataset/flowers/
          cls_label_path: ./dataset/flowers/train_list.txt
          delimiter: " "        # split on the LAST occurrence, so paths may contain it
          relabel: False        # True: map the sorted unique labels to 0..K-1
          transform_ops: [...]

    ``class_num`` comes from ``Arch.class_num`` (passed by the builder): labels must be below it.
    """

    def __init__(self, image_root: str, cls_label_path: str, transform_ops: Optional[list] = None,
                 delimiter: Optional[str] = " ", relabel: bool = False,
                 class_num: Optional[int] = None):
        self.image_root = image_root
        self.cls_label_path = cls_label_path
        self.delimiter = delimiter if delimiter not in (None, "") else " "
        samples = self._read_list(relabel, class_num)
        self._setup(samples, transform_ops, class_num)

    def _read_list(self, relabel, class_num):
        list_path = self.cls_label_path
        if not os.path.isfile(list_path):
            raise DataError(f"{list_path}: label list not found; set dataset.cls_label_path to an "
                            "existing 'relative/path label' file")
        if not os.path.isdir(self.image_root):
            raise DataError(f"{self.image_root}: image_root is not a directory; set "
                            "dataset.image_root to the folder the list paths are relative to")
        name = os.path.basename(list_path)
        entries, problems = [], []
        for lineno, line in enumerate(_read_lines(list_path), start=1):
            line = line.strip()
            if not line:
                continue
            rel, sep, label_text = line.rpartition(self.delimiter)
            label = _parse_label(label_text) if sep else None
            if not sep or not rel.strip():
                problems.append((lineno, f"expected 'relative/path{self.delimiter}label', got "
                                         f"{line!r} (paths with spaces need another delimiter)"))
            elif label is None or label < 0:
                problems.append((lineno, f"label {label_text.strip()!r} is not a "
                                         "non-negative integer"))
            else:
                entries.append((lineno, os.path.join(self.image_root, rel.strip()), label))
        if relabel:
            mapping = {old: new for new, old in enumerate(sorted({e[2] for e in entries}))}
            entries = [(n, p, mapping[lab]) for n, p, lab in entries]
        for lineno, path, label in entries:
            if not os.path.isfile(path):
                problems.append((lineno, f"image not found: {path}"))
            elif class_num is not None and label >= class_num:
                problems.append((lineno, f"label {label} >= Arch.class_num {class_num}"))
        problems = [f"{name}:{n}: {msg}" for n, msg in sorted(problems)]
        _raise_problems(problems, f"Fix or remove these lines in {list_path} (or set "
                                  "Arch.class_num to the number of classes / relabel: True).")
        if not entries:
            raise DataError(f"{list_path}: no samples; the list is empty")
        return [(p, lab) for _, p, lab in entries]


@DATASETS.register
class CustomLabelDataset(_ImageDataset):
    """Images whose label is made by a transform (PaddleClas's self-supervised PULC models).

    YAML (clarity_assessment / image_orientation)::

        dataset:
          name: CustomLabelDataset
          image_root: ./dataset/
          sample_list_path: ./dataset/train_list.txt   # one relative image path per line
          label_key: blur_image                        # made by BlurImage; RandomRot90 makes
          transform_ops: [...]                         # random_rot90_orientation
          delimiter: null                              # set: keep the text before its first
                                                       # occurrence (PaddleClas), e.g. "\t"

    The label of an item is drawn anew every time it is loaded, so ``labels`` (used for class
    counts) is empty: ``class_weight: auto`` and ``ClassBalancedSampler`` need fixed labels and
    cannot be used with this dataset. PaddleClas returns images without labels when
    ``label_key`` is unset, which cannot train; here it is required and must be produced by an
    op in ``transform_ops``.
    """

    def __init__(self, image_root: str, sample_list_path: str, label_key: Optional[str] = None,
                 transform_ops: Optional[list] = None, delimiter: Optional[str] = None,
                 class_num: Optional[int] = None):
        self._setup([], transform_ops, class_num)
        made = self.transform.label_keys()
        if label_key is None or label_key not in made:
            made_text = ", ".join(made) or ("none does: add BlurImage (blur_image) or RandomRot90 "
                                            "(random_rot90_orientation)")
            raise ConfigError("label_key", f"is {label_key!r}; it must name a label an op in "
                                           f"transform_ops makes ({made_text})")
        # Checked here, not per item: an error raised inside a loader worker stalls the loader.
        count = next(op.label_count for op in self.transform.ops
                     if getattr(op, "label_key", None) == label_key)
        if class_num is not None and class_num < count:
            raise ConfigError("Arch.class_num", f"is {class_num} but {label_key} takes {count} "
                                                f"values (0..{count - 1}); set Arch.class_num: {count}")
        if not os.path.isfile(sample_list_path):
            raise DataError(f"{sample_list_path}: sample list not found; set dataset.sample_list_path "
                            "to a file with one relative image path per line")
        if not os.path.isdir(image_root):
            raise DataError(f"{image_root}: image_root is not a directory; set dataset.image_root "
                            "to the folder the list paths are relative to")
        self.image_root, self.sample_list_path, self.label_key = image_root, sample_list_path, label_key
        name = os.path.basename(sample_list_path)
        samples, problems = [], []
        with open(sample_list_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if delimiter:
                    line = line.split(delimiter)[0].strip()
                if not line:
                    continue
                path = os.path.join(image_root, line)
                if os.path.isfile(path):
                    samples.append((path, None))
                else:
                    problems.append(f"{name}:{lineno}: image not found: {path}")
        _raise_problems(problems, f"Fix or remove these lines in {sample_list_path}.")
        if not samples:
            raise DataError(f"{sample_list_path}: no samples; the list is empty")
        self.samples = samples
        self.labels = np.zeros((0,), np.int64)  # labels are drawn per load; see the docstring

    def _load(self, path):
        with open(path, "rb") as f:
            data = f.read()
        img, labels = self.transform.to_chw(data, with_labels=True)
        return img, int(labels[self.label_key])

    def __getitem__(self, idx):
        path, _ = self.samples[idx]
        try:
            img, label = self._load(path)
        except (OSError, DataError) as e:
            if path not in self._warned:
                self._warned.add(path)
                logger.warning("skipping unreadable image %s: %s", path, e)
            return None
        return img, np.int64(label)


def class_folders(image_root):
    """Sorted sub-folder names of ``image_root``: label ``i`` is ``class_folders(root)[i]``."""
    return sorted(d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)))


def list_images(infer_imgs, where="Global.infer_imgs"):
    """A file, a directory (its images and those of its sub-folders, sorted) or a list -> paths."""
    from pathlib import Path

    from ..errors import ConfigError

    items = infer_imgs if isinstance(infer_imgs, list) else [infer_imgs]
    paths = []
    for item in items:
        p = Path(str(item))
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in _IMAGE_EXTENSIONS)
        elif p.is_file():
            paths.append(str(p))
        else:
            raise ConfigError(where, f"{str(p)!r} is neither an image file nor a directory")
    if not paths:
        raise ConfigError(where, f"no images ({', '.join(_IMAGE_EXTENSIONS)}) found in {infer_imgs!r}")
    return paths


@DATASETS.register
class ImageFolderDataset(_ImageDataset):
    """Folder per class: ``image_root/<class name>/**/<image>``; classes sorted by name.

    YAML::

        dataset:
          name: ImageFolderDataset
          image_root: ./dataset/flowers/train
          extensions: [.jpg, .jpeg, .png]
          transform_ops: [...]

    ``class_names[i]`` is the folder of label ``i``.
    """

    def __init__(self, image_root: str, transform_ops: Optional[list] = None,
                 extensions: Optional[list] = None, class_num: Optional[int] = None):
        if not os.path.isdir(image_root):
            raise DataError(f"{image_root}: image_root is not a directory; set dataset.image_root "
                            "to a folder with one sub-folder per class")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                     for e in (extensions or _IMAGE_EXTENSIONS))
        self.image_root = image_root
        self.class_names = class_folders(image_root)
        if not self.class_names:
            raise DataError(f"{image_root}: no class sub-folders found")
        if class_num is not None and len(self.class_names) > class_num:
            raise DataError(f"{image_root}: {len(self.class_names)} class folders but "
                            f"Arch.class_num is {class_num}; set Arch.class_num to "
                            f"{len(self.class_names)}")
        samples = []
        for label, cls in enumerate(self.class_names):
            for dirpath, dirnames, files in os.walk(os.path.join(image_root, cls)):
                dirnames.sort()
                samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                            if f.lower().endswith(exts)]
        if not samples:
            raise DataError(f"{image_root}: no images with extensions {list(exts)}")
        self._setup(samples, transform_ops, class_num)


def collate_skip_none(batch):
    """Stack ``(image, label)`` items, dropping ``None`` (unreadable images).

    Returns ``(images float32 [N,C,H,W], labels int64 [N], n_skipped int64 [1])``. When every
    item was dropped, images has shape [0] and labels [0]: the train step must skip the batch.
    """
    items = [b for b in batch if b is not None]
    n_skipped = np.asarray([len(batch) - len(items)], dtype=np.int64)
    if not items:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64), n_skipped
    images = np.stack([it[0] for it in items]).astype(np.float32, copy=False)
    labels = np.asarray([it[1] for it in items], dtype=np.int64)
    return images, labels, n_skipped
