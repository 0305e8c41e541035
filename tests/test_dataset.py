"""Datasets, list validation, corrupt-image skipping, samplers and the loader builder."""
import logging

import numpy as np
import pytest

from ppcls_ft.data.dataset import ImageFolderDataset, ImageNetDataset, collate_skip_none
from ppcls_ft.data.loader import build_dataloader, close, iterate, limit_batches, set_epoch, start_workers
from ppcls_ft.data.samplers import ClassBalancedSampler
from ppcls_ft.errors import ConfigError, DataError

TRAIN_OPS = [{"DecodeImage": {"to_rgb": True}},
             {"RandCropImage": {"size": 16}},
             {"RandFlipImage": {"flip_code": 1}},
             {"NormalizeImage": {"scale": 0.00392156862745098, "order": ""}}]


def _ds(root, list_path, **kw):
    return ImageNetDataset(image_root=str(root), cls_label_path=str(list_path), **kw)


def test_items_are_float32_chw_and_int64(tiny_dataset):
    root, train_list, _ = tiny_dataset
    ds = _ds(root, train_list, transform_ops=TRAIN_OPS, class_num=3)
    assert len(ds) == 12
    img, label = ds[5]
    assert img.shape == (3, 16, 16) and img.dtype == np.float32
    assert label.dtype == np.int64 and label == ds.labels[5]
    np.testing.assert_array_equal(ds.class_counts(), [4, 4, 4])
    raw, _ = _ds(root, train_list)[0]  # no transform_ops: decoded, CHW, float32
    assert raw.shape == (3, 40, 48) and raw.dtype == np.float32


def test_list_errors_name_file_and_line(tiny_dataset):
    root, train_list, _ = tiny_dataset
    lines = train_list.read_text().splitlines()
    lines.insert(2, "")  # blank lines are fine
    lines[4] = "images/c0/missing.jpg 0"
    lines[6] = "images/c0/1.jpg zero"
    lines[7] = "images/c0/2.jpg -1"
    train_list.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        _ds(root, train_list)
    msg = str(info.value)
    assert msg.startswith("train_list.txt:5: image not found")
    assert "train_list.txt:7: label 'zero'" in msg and "train_list.txt:8: label '-1'" in msg
    assert "3 bad sample(s)" in msg


def test_label_beyond_class_num(tiny_dataset):
    root, train_list, _ = tiny_dataset
    with pytest.raises(DataError, match=r"train_list.txt:9: label 2 >= Arch.class_num 2"):
        _ds(root, train_list, class_num=2)


def test_relabel_delimiter_and_spaces_in_paths(tmp_path):
    import cv2
    root = tmp_path / "d"
    (root / "my images").mkdir(parents=True)
    for name in ("a b.jpg", "c.jpg"):
        cv2.imwrite(str(root / "my images" / name), np.full((8, 8, 3), 100, np.uint8))
    (root / "l.txt").write_text("my images/a b.jpg 7\n\nmy images/c.jpg 3\n")
    ds = _ds(root, root / "l.txt", relabel=True)
    assert ds.samples[0][0].endswith("a b.jpg")
    np.testing.assert_array_equal(ds.labels, [1, 0])
    (root / "t.txt").write_text("my images/a b.jpg\t7\n")
    assert _ds(root, root / "t.txt", delimiter="\t").labels.tolist() == [7]


def test_corrupt_image_is_skipped_and_counted(tiny_dataset, caplog):
    root, train_list, _ = tiny_dataset
    (root / "images/c1/2.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    ds = _ds(root, train_list, transform_ops=TRAIN_OPS)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("c1/2.jpg"))
    with caplog.at_level(logging.WARNING, logger="ppcls_ft.data.dataset"):
        assert ds[bad] is None and ds[bad] is None
    warnings = [r for r in caplog.records if "c1/2.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "cannot decode" in warnings[0].getMessage()
    images, labels, n_skipped = collate_skip_none([ds[0], ds[bad], ds[1]])
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == ds.labels[:2].tolist()
    assert n_skipped.dtype == np.int64 and n_skipped.tolist() == [1]
    empty = collate_skip_none([None, None])
    assert empty[0].shape[0] == 0 and empty[2].tolist() == [2]


def test_image_folder_dataset(tiny_dataset):
    root, _, _ = tiny_dataset
    ds = ImageFolderDataset(image_root=str(root / "images"), transform_ops=TRAIN_OPS)
    assert ds.class_names == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(ds.class_counts(), [4, 4, 4])
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match="class_num"):
        ImageFolderDataset(image_root=str(root / "images"), class_num=2)


def _section(root, train_list, workers=0, sampler=None):
    return {"dataset": {"name": "ImageNetDataset", "image_root": str(root),
                        "cls_label_path": str(train_list), "transform_ops": TRAIN_OPS,
                        "batch_transform_ops": [{"MixupOperator": {"alpha": 0.2}}]},
            "sampler": sampler or {"name": "DistributedBatchSampler", "batch_size": 5,
                                   "shuffle": True, "drop_last": False},
            "loader": {"num_workers": workers, "use_shared_memory": False}}


def _epoch(loader, epoch):
    set_epoch(loader, epoch)
    return [tuple(np.asarray(t) for t in batch) for batch in loader]


def test_loader_workers_match_in_process_and_epochs_reproduce(tiny_dataset):
    root, train_list, _ = tiny_dataset
    single = build_dataloader(_section(root, train_list, 0), "train", seed=7, class_num=3)
    multi = build_dataloader(_section(root, train_list, 2), "train", seed=7, class_num=3)
    assert len(single) == 3
    a0, b0 = _epoch(single, 0), _epoch(multi, 0)
    assert [x[0].shape for x in a0] == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]
    for x, y in zip(a0, b0):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    a1 = _epoch(single, 1)
    assert not np.array_equal(a0[0][0], a1[0][0])  # a new epoch: new order and augmentation
    np.testing.assert_array_equal(_epoch(single, 1)[0][0], a1[0][0])  # same epoch: same data


def test_loader_workers_persist_across_epochs_and_end_when_closed_or_left_early(tiny_dataset):
    """A loader's workers are forked once, not per epoch (a fork makes the next step copy every
    page it writes); the data stays that of a loader without workers. A loop left early ends
    them, and the next loop still gets the whole epoch; close() ends them."""
    import multiprocessing
    import time

    root, train_list, _ = tiny_dataset
    single = build_dataloader(_section(root, train_list, 0), "train", seed=7, class_num=3)
    multi = build_dataloader(_section(root, train_list, 1), "train", seed=7, class_num=3)
    before = {p.pid for p in multiprocessing.active_children()}

    def workers(wait_for_none=False):
        deadline = time.time() + 20
        while True:
            alive = {p.pid for p in multiprocessing.active_children()} - before
            if not (wait_for_none and alive) or time.time() > deadline:
                return alive
            time.sleep(0.1)

    def run(loader, epoch):
        set_epoch(loader, epoch)
        return [tuple(np.asarray(t) for t in batch) for batch in iterate(loader)]

    def assert_same(got, want, batches=3):
        assert len(got) == len(want) == batches
        for x, y in zip(got, want):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(u, v)

    assert_same(run(multi, 0), run(single, 0))
    first = workers()
    assert len(first) == 1
    assert_same(run(multi, 1), run(single, 1))
    assert workers() == first  # the same process served the next epoch
    set_epoch(multi, 2)
    for _ in iterate(multi):
        break
    assert workers(wait_for_none=True) == set()
    assert_same(run(multi, 2), run(single, 2))
    assert len(workers()) == 1
    close(multi)
    assert workers(wait_for_none=True) == set()
    assert_same(run(multi, 3), run(single, 3))  # a closed loader starts new workers
    close(multi)
    assert workers(wait_for_none=True) == set()

    # started before any loop (builder.py does so before the model exists), and cut to 2 of
    # its 3 batches (the trainer drops a partial accumulation group): still one process
    start_workers(multi)
    started = workers()
    assert len(started) == 1
    limit_batches(multi, 2)
    limit_batches(single, 2)
    assert len(multi) == 2
    for epoch in (4, 5):
        assert_same(run(multi, epoch), run(single, epoch), batches=2)
        assert workers() == started
    close(multi)


_LEFT_OPEN = """
import json, sys
from ppcls_ft.data.loader import build_dataloader

def one_epoch():  # the loader goes out of scope with its workers running, as in most scripts
    loader = build_dataloader(json.loads(sys.argv[1]), "train", seed=7, class_num=3)
    return sum(len(batch[1]) for batch in loader)

print(one_epoch(), flush=True)
"""


def test_a_process_that_never_closes_its_loader_still_exits(tiny_dataset):
    """Workers ignore SIGTERM (stop signals are the main process's), so multiprocessing's exit
    handler, which ends daemon workers with SIGTERM and then waits for them, would wait forever
    on persistent workers nobody closed; ppcls_ft's own exit handler closes them first."""
    import json
    import subprocess
    import sys

    root, train_list, _ = tiny_dataset
    section = json.dumps(_section(root, train_list, 2))
    proc = subprocess.run([sys.executable, "-c", _LEFT_OPEN, section], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["12"]  # one whole epoch of the 12 images


def test_loader_errors_name_config_path(tiny_dataset):
    root, train_list, _ = tiny_dataset
    sec = _section(root, train_list)
    sec["dataset"]["transform_ops"] = [{"DecodeImage": None}, {"RandCropImag": {"size": 8}}]
    with pytest.raises(ConfigError, match=r"DataLoader.Train.dataset.transform_ops.1.*RandCropImage"):
        build_dataloader(sec, "train")
    sec = _section(root, train_list)
    sec["loader"]["num_worker"] = 1
    with pytest.raises(ConfigError, match=r"DataLoader.Eval.loader.num_worker"):
        build_dataloader(sec, "eval", path="DataLoader.Eval")
    sec = _section(root, train_list)
    sec["sampler"]["batchsize"] = 4
    with pytest.raises(ConfigError, match=r"sampler.batchsize"):
        build_dataloader(sec, "train")


def test_class_balanced_sampler_balances_and_splits_ranks():
    class Fake:
        labels = np.array([0] * 90 + [1] * 10)

        def __len__(self):
            return 100

    sampler = ClassBalancedSampler(Fake(), batch_size=10, seed=1, num_replicas=1, rank=0)
    counts = np.zeros(2)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 10
        counts += np.bincount(Fake.labels[np.concatenate(batches)], minlength=2)
    assert abs(counts[1] / counts.sum() - 0.5) < 0.05  # 10% of the data, ~50% of the draws
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first
    ranks = [ClassBalancedSampler(Fake(), batch_size=10, seed=1, num_replicas=2, rank=r)
             for r in (0, 1)]
    per_rank = [np.concatenate(list(s)) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 50
    merged = np.empty(100, np.int64)
    merged[0::2], merged[1::2] = per_rank
    single = ClassBalancedSampler(Fake(), batch_size=100, seed=1, num_replicas=1, rank=0)
    np.testing.assert_array_equal(merged, next(iter(single)))  # striding of one draw


def test_loader_with_class_balanced_sampler(tiny_dataset):
    root, train_list, _ = tiny_dataset
    sec = _section(root, train_list, sampler={"name": "ClassBalancedSampler", "batch_size": 4})
    loader = build_dataloader(sec, "train", seed=3)
    batches = _epoch(loader, 0)
    assert sum(b[1].shape[0] for b in batches) == 12


def test_flowers5_eval_pipeline(shared):
    root = shared / "data" / "flowers5"
    ops = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
           {"ResizeImage": {"resize_short": 256}}, {"CropImage": {"size": 224}},
           {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225], "order": ""}}]
    ds = _ds(root, root / "val_list_mini.txt", transform_ops=ops, class_num=5)
    assert len(ds) == 100
    np.testing.assert_array_equal(ds.class_counts(), [20] * 5)
    images, labels, skipped = collate_skip_none([ds[i] for i in range(0, 100, 25)])
    assert images.shape == (4, 3, 224, 224) and images.dtype == np.float32
    assert labels.dtype == np.int64 and ((labels >= 0) & (labels < 5)).all()
    assert skipped.tolist() == [0]
    assert -2.2 < images.min() < images.max() < 2.7  # ImageNet-normalised range


def test_custom_label_dataset_takes_its_label_from_a_transform(tiny_dataset):
    import random
    from ppcls_ft.data.dataset import CustomLabelDataset
    root, train_list, _ = tiny_dataset
    paths = root / "paths.txt"
    # PaddleClas keeps the text before the first delimiter when one is set
    paths.write_text("".join(f"{line.split(' ')[0]}\textra\n" for line in
                             train_list.read_text().splitlines()))
    ds = CustomLabelDataset(image_root=str(root), sample_list_path=str(paths), delimiter="\t",
                            label_key="random_rot90_orientation", class_num=4,
                            transform_ops=[{"DecodeImage": None}, {"ResizeImage": {"size": [12, 8]}},
                                           {"RandomRot90": None},
                                           {"NormalizeImage": {"order": ""}}])
    assert len(ds) == 12 and ds.labels.size == 0  # labels are drawn per load
    shapes = {}
    for seed in range(12):
        random.seed(seed)
        img, label = ds[seed % len(ds)]
        assert img.dtype == np.float32 and label.dtype == np.int64
        shapes.setdefault(int(label), img.shape)
    # an odd number of quarter turns swaps height and width of the 8x12 image
    assert all(shape == ((3, 12, 8) if k % 2 else (3, 8, 12)) for k, shape in shapes.items())
    assert len(shapes) > 1


def test_custom_label_dataset_errors_name_the_key(tiny_dataset):
    from ppcls_ft.data.dataset import CustomLabelDataset
    root, train_list, _ = tiny_dataset
    kw = dict(image_root=str(root), sample_list_path=str(train_list))
    with pytest.raises(ConfigError, match="label_key.*BlurImage"):
        CustomLabelDataset(label_key="blur_image", transform_ops=[{"DecodeImage": None}], **kw)
    with pytest.raises(ConfigError, match="Arch.class_num.*4"):
        CustomLabelDataset(label_key="random_rot90_orientation", class_num=3,
                           transform_ops=[{"DecodeImage": None}, {"RandomRot90": None}], **kw)
    # without a delimiter the whole line is the path, as in PaddleClas: "x.jpg 0" does not exist
    with pytest.raises(DataError, match="image not found"):
        CustomLabelDataset(label_key="blur_image",
                           transform_ops=[{"DecodeImage": None}, {"BlurImage": None}], **kw)


def test_list_line_with_spaces_keeps_the_label_after_the_last_delimiter(tmp_path):
    """PaddleClas splits on every delimiter and takes field 1, so 'a b.jpg 3' fails there;
    here the label is the text after the last delimiter, so paths with spaces work."""
    import cv2
    root = tmp_path / "d"
    (root / "x y").mkdir(parents=True)
    cv2.imwrite(str(root / "x y" / "p q r.jpg"), np.full((8, 8, 3), 9, np.uint8))
    (root / "l.txt").write_text("x y/p q r.jpg 2\n")
    ds = _ds(root, root / "l.txt", class_num=3)
    assert ds.samples == [(str(root / "x y" / "p q r.jpg"), 2)]
