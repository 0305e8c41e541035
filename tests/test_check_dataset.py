"""tools/check_dataset.py (counts, unreadable, tiny, exact/near duplicates, leakage, verdict) and
tools/split_dataset.py (stratified, seeded, duplicates kept on one side)."""
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import REPO


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _picture(rng, size=96):
    """A smooth random picture (blobs), so perceptual hashes of different pictures differ."""
    small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.fixture
def messy(tmp_path):
    """Train: 6 of class 0, 2 of class 1 (imbalanced), one unreadable, one tiny. Val: an exact
    copy (PNG, same pixels) and a near copy (smaller, JPEG q60) of training images, 2 new."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    train, val = [], []
    for i in range(8):
        cv2.imwrite(str(root / "img" / f"t{i}.png"), _picture(rng))
        train.append(f"img/t{i}.png {0 if i < 6 else 1}")
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    train.append("img/broken.jpg 1")
    cv2.imwrite(str(root / "img" / "tiny.png"), _picture(rng, 20))
    train.append("img/tiny.png 1")
    same = cv2.imread(str(root / "img" / "t0.png"))
    cv2.imwrite(str(root / "img" / "v_exact.bmp"), same)  # other bytes, same pixels
    near = cv2.resize(cv2.imread(str(root / "img" / "t1.png")), (80, 80), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "img" / "v_near.jpg"), near, [cv2.IMWRITE_JPEG_QUALITY, 60])
    val += ["img/v_exact.bmp 0", "img/v_near.jpg 0"]
    for i in range(2):
        cv2.imwrite(str(root / "img" / f"v{i}.png"), _picture(rng))
        val.append(f"img/v{i}.png {i}")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("\n".join(val) + "\n")
    (root / "label_list.txt").write_text("0 cat\n1 dog\n")
    cfg = {"Global": {"output_dir": str(tmp_path / "out")}, "Arch": {"name": "ResNet18", "class_num": 2},
           "DataLoader": {m: {"dataset": {"name": "ImageNetDataset", "image_root": str(root),
                                          "cls_label_path": str(root / f"{m.lower()}.txt")},
                              "sampler": {"name": "DistributedBatchSampler", "batch_size": 2}}
                          for m in ("Train", "Val")}}
    cfg["DataLoader"]["Eval"] = cfg["DataLoader"].pop("Val")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root, tmp_path / "out"


def test_check_dataset_finds_what_is_wrong(messy, capsys):
    cfg, root, out = messy
    assert _tool("check_dataset").main(["-c", str(cfg)]) == 0  # training can still start
    report = json.loads((out / "check_dataset.json").read_text())
    train, val = report["splits"]["Train"], report["splits"]["Eval"]
    assert train["samples"] == 10 and val["samples"] == 4
    assert train["class_counts"] == {"0": 6, "1": 4} and val["class_counts"] == {"0": 3, "1": 1}
    assert [u["path"] for u in train["unreadable"]] == [str(root / "img" / "broken.jpg")]
    assert "cannot decode" in train["unreadable"][0]["reason"]
    assert train["tiny"] == [str(root / "img" / "tiny.png")] and report["tiny_below_px"] == 32
    dups = {(Path(d["a"]).name, Path(d["b"]).name, d["split_a"], d["split_b"], d["kind"])
            for d in report["duplicates"]}
    assert dups == {("t0.png", "v_exact.bmp", "Train", "Eval", "exact"),
                    ("t1.png", "v_near.jpg", "Train", "Eval", "near")}
    assert "train/val leakage" in report["verdict"] and "few images per class" in report["verdict"]
    assert any("2 val images duplicate training images" in a for a in report["advice"])
    for png in ("class_histogram.png", "image_sizes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "duplicates: 1 exact, 1 near, 2 across splits" in printed


def test_check_dataset_exits_non_zero_only_when_training_cannot_start(messy, tmp_path):
    cfg, root, _ = messy
    (root / "train.txt").write_text("img/broken.jpg 0\n")
    assert _tool("check_dataset").main(["-c", str(cfg)]) == 1
    (root / "train.txt").write_text("img/missing.jpg 0\n")
    with pytest.raises(SystemExit) as exc:  # a list error is a user error: one line, exit 2
        _tool("check_dataset").main(["-c", str(cfg)])
    assert exc.value.code == 2


def test_split_is_stratified_seeded_and_keeps_duplicates_together(tmp_path):
    rng = np.random.default_rng(1)
    tree = tmp_path / "tree"
    for c, n in (("apple", 20), ("pear", 10)):
        (tree / c).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tree / c / f"{i}.png"), _picture(rng))
    for k in range(3):  # three near copies of apple/0.png: one group of four
        img = cv2.resize(cv2.imread(str(tree / "apple" / "0.png")), (90 - 5 * k, 90 - 5 * k))
        cv2.imwrite(str(tree / "apple" / f"0_copy{k}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 70])
    split = _tool("split_dataset")
    sides = {}
    for seed in (0, 1):
        out = tmp_path / f"lists{seed}"
        assert split.main(["--root", str(tree), "--val", "0.25", "--test", "0.1", "--seed", str(seed),
                           "--out", str(out)]) == 0
        lists = {s: (out / f"{s}_list.txt").read_text().split("\n")[:-1] for s in ("train", "val", "test")}
        side = {line.split()[0]: s for s, lines in lists.items() for line in lines}
        assert len(side) == 33 and (out / "label_list.txt").read_text() == "0 apple\n1 pear\n"
        group = {side[f"apple/{n}"] for n in ("0.png", "0_copy0.jpg", "0_copy1.jpg", "0_copy2.jpg")}
        assert len(group) == 1, group  # the picture and its copies on one side
        pears = [s for p, s in side.items() if p.startswith("pear/")]
        assert (pears.count("val"), pears.count("test")) == (2, 1)  # round(10 x 0.25), round(10 x 0.1)
        sides[seed] = side
        from ppcls_ft.data.dataset import ImageNetDataset
        ds = ImageNetDataset(str(tree), str(out / "train_list.txt"))
        assert len(ds) == len(lists["train"])
    assert sides[0] != sides[1]  # the seed decides
