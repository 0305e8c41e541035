"""Per-image transforms: PaddleClas formulas, determinism under a seed, build_transforms errors."""
import random

import cv2
import numpy as np
import pytest

from ppcls_ft.data import transforms as T
from ppcls_ft.errors import ConfigError, DataError
from ppcls_ft.registry import TRANSFORMS


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w,short", [(37, 51, 20), (33, 65, 16), (65, 33, 17), (227, 227, 256)])
@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_resize_short_rounding(h, w, short, backend):
    out = T.ResizeImage(resize_short=short, backend=backend)(_img(h, w))
    scale = short / min(h, w)
    assert out.shape == (int(round(h * scale)), int(round(w * scale)), 3)
    assert min(out.shape[:2]) == short
    assert out.dtype == np.uint8


@pytest.mark.parametrize("backend", ["cv2", "pil"])
@pytest.mark.parametrize("interp", [None, "nearest", "bilinear", "area", "bicubic", "lanczos", "random"])
def test_resize_size_backends_and_interpolations(backend, interp):
    out = T.ResizeImage(size=[30, 20], interpolation=interp, backend=backend)(_img(41, 57))
    assert out.shape == (20, 30, 3)  # size is [w, h]
    assert T.ResizeImage(size=24, interpolation=interp, backend=backend)(_img(41, 57)).shape == (24, 24, 3)


def test_resize_default_is_bilinear_on_both_backends_like_paddleclas():
    from PIL import Image
    img = _img(31, 45)
    ours = T.ResizeImage(size=[20, 13], backend="pil")(img)
    ref = np.asarray(Image.fromarray(img).resize((20, 13), Image.BILINEAR))
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(ours, np.asarray(Image.fromarray(img).resize((20, 13), Image.BICUBIC)))
    cv = T.ResizeImage(size=[20, 13])(img)
    np.testing.assert_array_equal(cv, cv2.resize(img, (20, 13), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_random_interpolation_picks_bilinear_or_bicubic_only(backend):
    from PIL import Image
    img = _img(31, 45)
    if backend == "cv2":
        refs = {n: cv2.resize(img, (20, 13), interpolation=f) for n, f in
                (("bilinear", cv2.INTER_LINEAR), ("bicubic", cv2.INTER_CUBIC))}
    else:
        refs = {n: np.asarray(Image.fromarray(img).resize((20, 13), f)) for n, f in
                (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC))}
    op = T.ResizeImage(size=[20, 13], interpolation="random", backend=backend)
    random.seed(0)
    seen = set()
    for _ in range(40):
        out = op(img)
        match = [n for n, ref in refs.items() if np.array_equal(out, ref)]
        assert match, "random chose a method other than bilinear or bicubic"
        seen.update(match)
    assert seen == {"bilinear", "bicubic"}


def test_resize_rejects_bad_params():
    with pytest.raises(ValueError, match="resize_short"):
        T.ResizeImage()
    with pytest.raises(ValueError, match="not available with backend .cv2.*lanczos"):
        T.ResizeImage(size=8, interpolation="hamming", backend="cv2")
    with pytest.raises(ValueError, match="backend"):
        T.ResizeImage(size=8, backend="skimage")


@pytest.mark.parametrize("h,w,size", [(11, 16, 7), (10, 15, [6, 3]), (9, 9, 9)])
def test_center_crop_offsets(h, w, size):
    img = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3)
    cw, ch = (size, size) if isinstance(size, int) else size
    out = T.CropImage(size=size)(img)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    assert out.shape == (ch, cw, 3)
    np.testing.assert_array_equal(out, img[y0:y0 + ch, x0:x0 + cw])


def test_center_crop_larger_than_image_fails_clearly():
    with pytest.raises(DataError, match="resize first"):
        T.CropImage(size=32)(_img(20, 40))


@pytest.mark.parametrize("scale", [None, 0.00392156862745098, "1.0/255.0", "0.5"])
def test_normalize_formula(scale):
    img = _img(5, 7)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    out = T.NormalizeImage(scale=scale, mean=mean, std=std, order="")(img)
    s = {None: 1 / 255, "1.0/255.0": 1 / 255, "0.5": 0.5}.get(scale, scale)
    expect = (img.astype(np.float32) * np.float32(s) - np.float32(mean)) / np.float32(std)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_normalize_chw_fp16_and_4_channels():
    img = _img(4, 6)
    chw = T.NormalizeImage(order="chw")(img.transpose(2, 0, 1))
    hwc = T.NormalizeImage(order="")(img)
    np.testing.assert_allclose(chw, hwc.transpose(2, 0, 1), rtol=1e-6)
    four = T.NormalizeImage(order="", channel_num=4, output_fp16=True)(img)
    assert four.dtype == np.float16 and four.shape == (4, 6, 4)
    assert not four[..., 3].any()
    with pytest.raises(ValueError):
        T.NormalizeImage(scale="1/0")


def test_normalize_without_order_follows_the_layout_and_a_mismatch_names_order():
    img = _img(5, 6)
    hwc = T.NormalizeImage(order="")(img)
    np.testing.assert_allclose(T.NormalizeImage()(img), hwc, rtol=1e-6)  # no order: HWC seen
    np.testing.assert_allclose(T.NormalizeImage()(img.transpose(2, 0, 1)), hwc.transpose(2, 0, 1),
                               rtol=1e-6)  # ... and CHW
    np.testing.assert_allclose(T.NormalizeImage(order="chw")(img.transpose(2, 0, 1)),
                               hwc.transpose(2, 0, 1), rtol=1e-6)
    with pytest.raises(DataError, match="order: ''"):
        T.NormalizeImage(order="chw")(img)  # HWC with an explicit 'chw'
    with pytest.raises(DataError, match="ToCHWImage"):
        T.NormalizeImage(order="")(img.transpose(2, 0, 1))


def test_rand_crop_size_and_determinism():
    op = T.RandCropImage(size=[24, 16], interpolation="bilinear")
    img = _img(60, 90)
    random.seed(3)
    a = op(img)
    random.seed(3)
    b = op(img)
    assert a.shape == (16, 24, 3)
    np.testing.assert_array_equal(a, b)
    random.seed(4)
    boxes = {op.crop_box(90, 60) for _ in range(20)}
    assert len(boxes) > 1  # it is random between draws


@pytest.mark.parametrize("img_w,img_h", [(10, 100), (100, 10), (7, 7), (1, 50)])
def test_rand_crop_box_always_inside(img_w, img_h):
    op = T.RandCropImage(size=8, scale=[0.5, 1.0], ratio=[0.2, 5.0])
    random.seed(0)
    for _ in range(300):
        x, y, w, h = op.crop_box(img_w, img_h)
        assert 1 <= w and 1 <= h and x >= 0 and y >= 0
        assert x + w <= img_w and y + h <= img_h


@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_rand_crop_backends_give_requested_size(backend):
    out = T.RandCropImage(size=32, interpolation="bicubic", backend=backend)(_img(50, 70))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_rand_flip_is_either_identity_or_flip():
    img = _img(5, 8)
    op = T.RandFlipImage(flip_code=1)
    random.seed(0)
    outs = [op(img) for _ in range(40)]
    flipped = [np.array_equal(o, img[:, ::-1]) for o in outs]
    same = [np.array_equal(o, img) for o in outs]
    assert all(f or s for f, s in zip(flipped, same))
    assert any(flipped) and any(same)
    with pytest.raises(ValueError, match="flip_code"):
        T.RandFlipImage(flip_code=2)


def test_decode_bgr_to_rgb_and_bad_bytes():
    img = _img(9, 13)
    ok, png = cv2.imencode(".png", img)  # cv2 writes BGR
    out = T.DecodeImage(to_rgb=True)(png.tobytes())
    np.testing.assert_array_equal(out, img[:, :, ::-1])
    assert T.DecodeImage(to_rgb=False, channel_first=True)(png.tobytes()).shape == (3, 9, 13)
    with pytest.raises(DataError, match="cannot decode"):
        T.DecodeImage()(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError):
        T.DecodeImage()(b"")
    assert T.DecodeImage()(img) is img  # arrays pass through


EVAL_OPS = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"resize_short": 40}}, {"CropImage": {"size": 32}},
            {"NormalizeImage": {"scale": "1.0/255.0", "mean": [0.485, 0.456, 0.406],
                                "std": [0.229, 0.224, 0.225], "order": ""}},
            {"ToCHWImage": None}]


def test_build_transforms_compose_runs_pipeline():
    comp = T.build_transforms(EVAL_OPS, "Infer.transforms")
    assert [type(o).__name__ for o in comp.ops] == [next(iter(e)) for e in EVAL_OPS]
    assert comp.chw and not T.build_transforms(EVAL_OPS[:-1]).chw
    _, jpg = cv2.imencode(".jpg", _img(45, 61))
    out = comp(jpg.tobytes())
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert len(T.build_transforms(None)) == 0


def test_build_transforms_misspelt_op_names_index_and_suggestion():
    ops = [{"DecodeImage": None}, {"RandCropImag": {"size": 8}}]
    with pytest.raises(ConfigError) as info:
        T.build_transforms(ops, "DataLoader.Train.dataset.transform_ops")
    msg = str(info.value)
    assert "DataLoader.Train.dataset.transform_ops.1" in msg
    assert "did you mean 'RandCropImage'" in msg


def test_build_transforms_bad_key_and_value_paths():
    with pytest.raises(ConfigError, match=r"transform_ops\.1\.RandCropImage\.sizee.*'size'"):
        T.build_transforms([{"DecodeImage": None}, {"RandCropImage": {"sizee": 8}}])
    with pytest.raises(ConfigError, match=r"transform_ops\.0\.RandFlipImage: flip_code"):
        T.build_transforms([{"RandFlipImage": {"flip_code": 5}}])
    with pytest.raises(ConfigError, match=r"transform_ops\.0: each transform"):
        T.build_transforms([{"DecodeImage": None, "ToCHWImage": None}])
    with pytest.raises(ConfigError, match="missing required key 'size'"):
        T.build_transforms([{"CropImage": None}])


def _config_transform_lists(cfg):
    lists = [cfg.get("Infer", {}).get("transforms")]
    for mode in ("Train", "Eval"):
        lists.append(cfg.get("DataLoader", {}).get(mode, {}).get("dataset", {}).get("transform_ops"))
    return [x for x in lists if x]


def test_real_paddleclas_transform_lists_build(shared):
    """Every transform list in the real PaddleClas configs builds (ops of augment.py if present)."""
    from ppcls_ft.config import read_yaml
    real_img = next((shared / "images" / "imagenet").glob("*.*"))
    data = real_img.read_bytes()
    n_built = 0
    for path in sorted((shared / "paddleclas_configs").glob("*.yaml")):
        cfg = read_yaml(path)  # the project's reader: turns '1.0/3.0' into a number
        for ops in _config_transform_lists(cfg):
            ops = [e for e in ops if next(iter(e)) in TRANSFORMS]
            comp = T.build_transforms(ops, path.name)
            random.seed(0)
            np.random.seed(0)
            out = comp(data)
            assert out.ndim == 3 and 224 in out.shape, (path.name, out.shape)
            n_built += 1
    assert n_built >= 16


def test_decode_image_pil_backend_matches_cv2_on_a_png():
    img = _img(9, 11)
    ok, png = cv2.imencode(".png", img[:, :, ::-1])  # lossless: both decoders must agree exactly
    data = png.tobytes()
    np.testing.assert_array_equal(T.DecodeImage(backend="pil")(data), img)
    np.testing.assert_array_equal(T.DecodeImage(backend="pil", to_rgb=False)(data), img[:, :, ::-1])
    np.testing.assert_array_equal(T.DecodeImage(backend="cv2", to_np=True)(data), img)
    with pytest.raises(DataError, match="PIL"):
        T.DecodeImage(backend="pil")(b"not an image")
    with pytest.raises(ConfigError, match="transform_ops.0.DecodeImage.*to_np"):
        T.build_transforms([{"DecodeImage": {"to_np": False}}])


def test_rand_crop_log_aspect_samples_ratio_in_log_space():
    """use_log_aspect: log(w/h) uniform in [log r0, log r1], so as many crops are wider than
    tall as taller than wide even for an asymmetric range around 1."""
    def wide_fraction(op):
        random.seed(0)
        boxes = [op.crop_box(400, 400) for _ in range(3000)]
        return np.mean([w > h for _, _, w, h in boxes])
    lin = T.RandCropImage(size=8, ratio=[0.25, 4.0], scale=[0.05, 0.05])
    log = T.RandCropImage(size=8, ratio=[0.25, 4.0], scale=[0.05, 0.05], use_log_aspect=True)
    assert wide_fraction(lin) > 0.75  # uniform on [0.25, 4]: P(ratio > 1) = 0.8
    assert abs(wide_fraction(log) - 0.5) < 0.05


def test_rand_crop_progress_size_is_accepted_and_logged_as_no_effect(caplog):
    import logging
    from ppcls_ft import config as C
    C._warned.discard("RandCropImage.progress_size")
    logger = logging.getLogger("ppcls_ft")
    logger.addHandler(caplog.handler)
    try:
        op = T.build_transforms([{"RandCropImage": {"size": 16, "progress_size": [8, 12]}}])
    finally:
        logger.removeHandler(caplog.handler)
    assert op(_img(30, 30)).shape == (16, 16, 3)
    assert "RandCropImage.progress_size" in caplog.text and "no effect" in caplog.text
