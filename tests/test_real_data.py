"""What real datasets contain: Chinese file and folder names, list files saved by Windows editors
(UTF-8 BOM, CRLF) or in GBK, and decompression bombs (huge in pixels, small in bytes)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_trainer import TINY

from ppcls_ft.config import load_config
from ppcls_ft.data.dataset import ImageNetDataset
from ppcls_ft.data.transforms import DEFAULT_MAX_PIXELS, DecodeImage
from ppcls_ft.engine.run import train
from ppcls_ft.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("玫瑰", "向日葵", "郁金香")


def chinese_dataset(root, newline="\r\n", bom=True, per_class=4):
    """Images under ``root/花卉 数据/<Chinese class>/图片_i.jpg``; the list names them in UTF-8."""
    image_root = root / "花卉 数据"
    rng = np.random.default_rng(0)
    lines = []
    for label, name in enumerate(CLASSES):
        (image_root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((36, 44, 3), 60 * label, np.uint8) + rng.integers(0, 30, (36, 44, 3), dtype=np.uint8)
            ok, buf = cv2.imencode(".jpg", img)
            (image_root / name / f"图片_{i}.jpg").write_bytes(buf.tobytes())  # cv2.imwrite cannot on Windows
            lines.append(f"{name}/图片_{i}.jpg {label}")
    text = newline.join(lines) + newline
    lst = root / "训练列表.txt"
    lst.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return image_root, lst


def bomb_png(path, side=30000):
    """A ``side`` x ``side`` PNG of one colour: under 1 MB on disk, 2.7 GB decoded as RGB."""
    ok, buf = cv2.imencode(".png", np.zeros((side, side), np.uint8))
    path.write_bytes(buf.tobytes())
    return path


@pytest.mark.parametrize("newline, bom", [("\r\n", True), ("\n", True), ("\r\n", False)])
def test_bom_crlf_and_chinese_names_read_every_sample(tmp_path, newline, bom):
    image_root, lst = chinese_dataset(tmp_path, newline, bom)
    ds = ImageNetDataset(image_root=str(image_root), cls_label_path=str(lst), class_num=3)
    assert len(ds) == 12
    assert ds.samples[0][0] == str(image_root / "玫瑰" / "图片_0.jpg")  # no BOM, no \r in the path
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    img, label = ds[11]
    assert img.shape == (3, 36, 44) and int(label) == 2


def test_gbk_list_is_refused_naming_file_and_line(tmp_path):
    image_root, _ = chinese_dataset(tmp_path)
    lst = tmp_path / "gbk.txt"
    lst.write_bytes("玫瑰/图片_0.jpg 0\n向日葵/图片_0.jpg 1\n".encode("gbk"))
    with pytest.raises(DataError, match=rf"{lst}:1: not UTF-8 text .* re-save the list as UTF-8"):
        ImageNetDataset(image_root=str(image_root), cls_label_path=str(lst))


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    data = bomb_png(tmp_path / "bomb.png").read_bytes()
    assert len(data) < 1_000_000
    with pytest.raises(DataError, match=r"900,000,000 pixels is above DecodeImage.max_pixels 178,956,970"):
        DecodeImage()(data)
    small = cv2.imencode(".png", np.zeros((300, 200, 3), np.uint8))[1].tobytes()
    with pytest.raises(DataError, match=r"200 x 300 = 60,000 pixels is above DecodeImage.max_pixels 1,000"):
        DecodeImage(max_pixels=1000)(small)
    assert DecodeImage(max_pixels=None)(small).shape == (300, 200, 3)
    assert DEFAULT_MAX_PIXELS >= 12032 * 9024  # a 108 MP camera photo still decodes


def test_decompression_bomb_never_reaches_memory(tmp_path):
    """Peak memory of a process asked to decode the bomb stays far below its 2.7 GB."""
    bomb = bomb_png(tmp_path / "bomb.png")
    # VmHWM is the peak RSS of this process image; ru_maxrss would also count the parent's
    # pages at fork time (Linux carries the high-water mark across exec).
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from ppcls_ft.data.transforms import DecodeImage
        from ppcls_ft.errors import DataError
        try:
            DecodeImage()(open({str(bomb)!r}, "rb").read())
        except DataError:
            pass
        status = open("/proc/self/status").read()
        print(int(status.split("VmHWM:")[1].split()[0]) // 1024)  # kB -> MiB
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 1024


def test_training_skips_the_bomb_with_a_message_and_finishes(tmp_path):
    image_root, lst = chinese_dataset(tmp_path)
    bomb_png(image_root / "玫瑰" / "炸弹.png")
    with open(lst, "a", encoding="utf-8", newline="") as f:
        f.write("玫瑰/炸弹.png 0\r\n")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(TINY.format(out=tmp_path / "输出", root=image_root, lst=lst, epochs=1, vdl=False)
                        .replace("warmup_epoch: 1", "warmup_epoch: 0"), encoding="utf-8")
    result = train(load_config(cfg_path))
    assert result["history"][0]["skipped_images"] == 1
    log = (tmp_path / "输出" / "train.log").read_text(encoding="utf-8")
    warned = [line for line in log.splitlines() if "炸弹.png" in line]
    assert warned and "WARNING skipping unreadable image" in warned[0]
    assert "900,000,000 pixels is above DecodeImage.max_pixels" in warned[0]
    assert (tmp_path / "输出" / "latest.pdparams").is_file()


def test_max_pixels_is_a_checked_config_key(tmp_path):
    from ppcls_ft.data.transforms import build_transforms
    from ppcls_ft.errors import ConfigError

    image_root, lst = chinese_dataset(tmp_path)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(TINY.format(out=tmp_path / "o", root=image_root, lst=lst, epochs=1, vdl=False),
                        encoding="utf-8")
    key = "DataLoader.Train.dataset.transform_ops.0.DecodeImage.max_pixels"
    cfg = load_config(cfg_path, [f"{key}=1000"])
    ops = cfg["DataLoader"]["Train"]["dataset"]["transform_ops"]
    assert build_transforms(ops).ops[0].max_pixels == 1000
    for bad, message in (("many", "expected"), (0, "must be a positive")):
        ops[0]["DecodeImage"]["max_pixels"] = bad
        with pytest.raises(ConfigError, match=rf"transform_ops.0.DecodeImage.*{message}"):
            build_transforms(ops)


def test_an_epoch_without_one_readable_image_stops_the_run(tmp_path):
    image_root, lst = chinese_dataset(tmp_path)
    for p in image_root.rglob("*.jpg"):
        p.write_bytes(b"not an image")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(TINY.format(out=tmp_path / "o", root=image_root, lst=lst, epochs=1, vdl=False)
                        .replace("warmup_epoch: 1", "warmup_epoch: 0"), encoding="utf-8")
    with pytest.raises(DataError, match="epoch 1: no image of DataLoader.Train was readable"):
        train(load_config(cfg_path))
    assert not (tmp_path / "o" / "latest.pdparams").exists()  # nothing trained, nothing saved


def test_infer_needs_weights_and_names_the_unreadable_file(tmp_path):
    from ppcls_ft.engine.run import infer
    from ppcls_ft.errors import ConfigError
    from ppcls_ft.inference_format import Preprocessor

    image_root, lst = chinese_dataset(tmp_path)
    cfg_path = tmp_path / "cfg.yaml"
    text = TINY.format(out=tmp_path / "o", root=image_root, lst=lst, epochs=1, vdl=False)
    cfg_path.write_text(text + "Infer:\n  transforms:\n    - DecodeImage: {to_rgb: True}\n",
                        encoding="utf-8")
    bad = tmp_path / "坏.jpg"
    bad.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="Global.pretrained_model: is required to predict"):
        infer(load_config(cfg_path, [f"Infer.infer_imgs={bad}"]))
    with pytest.raises(DataError, match=rf"{bad}: cannot decode 4 bytes"):
        Preprocessor([{"DecodeImage": None}])(bad)  # what infer and the Predictor decode with
