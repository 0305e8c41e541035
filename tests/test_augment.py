"""Tests for ppcls_ft/data/augment.py and autoaugment.py: shapes, dtypes, seeding, parsing, numerics."""
import random

import numpy as np
import pytest
from PIL import ImageOps

from ppcls_ft.data import augment as aug
from ppcls_ft.data import autoaugment as autoaug
from ppcls_ft.errors import ConfigError
from ppcls_ft.registry import TRANSFORMS


def _images(n=4, shape=(32, 40, 3), seed=0):
    rng = np.random.default_rng(seed)  # test data only; the ops draw from the global RNGs
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _seeded(op, img, seed):
    random.seed(seed)
    np.random.seed(seed)
    return op(img.copy())


UINT8_OPS = {
    "timm-rand-inc": lambda: aug.TimmAutoAugment(config_str="rand-m9-mstd0.5-inc1"),
    "timm-rand-n3-uniform": lambda: aug.TimmAutoAugment(config_str="rand-m7-n3-mstd101"),
    "timm-rand-w0": lambda: aug.TimmAutoAugment(config_str="rand-m9-w0", interpolation="random"),
    "timm-original": lambda: aug.TimmAutoAugment(config_str="original-mstd0.5"),
    "timm-v0": lambda: aug.TimmAutoAugment(config_str="v0", mean=[0.485, 0.456, 0.406]),
    "AutoAugment": lambda: aug.AutoAugment(),
    "RandAugment": lambda: aug.RandAugment(num_layers=2, magnitude=9),
    "ColorJitter": lambda: aug.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
    "Cutout": lambda: aug.Cutout(n_holes=2, length=12),
}


def test_all_ops_registered_and_build_from_yaml_values():
    for name in ("TimmAutoAugment", "AutoAugment", "RandAugment", "RandomErasing", "Cutout",
                 "ColorJitter", "GridMask", "HideAndSeek", "PCALighting", "RandomRot90", "BlurImage"):
        assert name in TRANSFORMS
    # the Swin config's values, with sh already converted from "1.0/3.0" by the config loader
    op = TRANSFORMS.build("RandomErasing", {"EPSILON": 0.25, "sl": 0.02, "sh": 1.0 / 3.0, "r1": 0.3,
                                            "attempt": 10, "use_log_aspect": True, "mode": "pixel"},
                          path="DataLoader.Train.dataset.transform_ops.3.RandomErasing")
    assert op.aspect_range == pytest.approx((np.log(0.3), np.log(1 / 0.3)))
    tf = TRANSFORMS.build("TimmAutoAugment", {"config_str": "rand-m9-mstd0.5-inc1",
                                              "interpolation": "bicubic", "img_size": 224})
    assert tf.hparams["translate_const"] == int(224 * 0.45)
    with pytest.raises(ConfigError, match="EPSILONN"):
        TRANSFORMS.build("RandomErasing", {"EPSILONN": 0.5}, path="RandomErasing")


@pytest.mark.parametrize("key", sorted(UINT8_OPS))
def test_uint8_ops_keep_shape_dtype_and_input(key):
    op = UINT8_OPS[key]()
    random.seed(1)
    np.random.seed(1)
    changed = 0
    for img in _images(6):
        before = img.copy()
        out = op(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(img, before), "the op must not modify its input"
        changed += int(not np.array_equal(out, img))
    assert changed >= 1, f"{key} never changed any of 6 images"


@pytest.mark.parametrize("key", sorted(UINT8_OPS) + ["RandomErasing"])
def test_same_seed_same_output_different_seed_differs(key):
    if key == "RandomErasing":
        op = aug.RandomErasing(EPSILON=1.0, mode="pixel")
        imgs = [(i.astype(np.float32) - 128) / 64 for i in _images(4)]
    else:
        op, imgs = UINT8_OPS[key](), _images(4)
    differs = False
    for img in imgs:
        first = _seeded(op, img, 7)
        assert np.array_equal(first, _seeded(op, img, 7))
        differs |= any(not np.array_equal(first, _seeded(op, img, s)) for s in (8, 9, 10))
    assert differs


def test_rand_config_string_parses_like_timm():
    tf = aug.TimmAutoAugment(config_str="rand-m9-mstd0.5-inc1")
    assert (tf.num_layers, tf.magnitude, tf.magnitude_std, tf.increasing) == (2, 9, 0.5, True)
    assert [op.name for op in tf.ops] == list(autoaug.RAND_INCREASING_TRANSFORMS)
    assert all(op.prob == 0.5 for op in tf.ops)
    cfg = autoaug.parse_config_str("rand-n3-m5-mstd101-mmax12-inc0-p0.7")
    assert cfg["num_layers"] == 3 and cfg["magnitude"] == 5 and cfg["magnitude_max"] == 12
    assert cfg["magnitude_std"] == float("inf") and cfg["prob"] == 0.7
    assert cfg["increasing"] is False  # timm reads inc0 as True; we do not
    plain = aug.TimmAutoAugment(config_str="rand-m9")
    assert [op.name for op in plain.ops] == list(autoaug.RAND_TRANSFORMS)
    orig = aug.TimmAutoAugment(config_str="original-mstd0.5")
    assert len(orig.sub_policies) == 25 and orig.magnitude_std == 0.5
    assert {op.name for sub in orig.sub_policies for op in sub} >= {"PosterizeOriginal", "Rotate"}


@pytest.mark.parametrize("config_str, token", [
    ("rand-m9-foo1", "foo1"), ("rand-m9-mstd", "mstd"), ("randy-m9", "randy"),
    ("original-m9", "m9"), ("rand-m9-w3", "w3"), ("augmix-m5-w4", "not supported"),
])
def test_bad_config_str_names_the_token(config_str, token):
    with pytest.raises(ConfigError, match="TimmAutoAugment.config_str") as err:
        aug.TimmAutoAugment(config_str=config_str)
    assert token in str(err.value)


def test_bad_interpolation_and_mean_are_config_errors():
    with pytest.raises(ConfigError, match="TimmAutoAugment.interpolation"):
        aug.TimmAutoAugment(interpolation="cubic")
    with pytest.raises(ConfigError, match="TimmAutoAugment.mean"):
        aug.TimmAutoAugment(mean=[123.7, 116.3, 103.5])
    assert aug.TimmAutoAugment(mean=[0.485, 0.456, 0.406]).hparams["fill"] == (124, 116, 104)
    # no mean: PaddleClas (and timm) fill with the ImageNet mean, not grey 128
    assert aug.TimmAutoAugment().hparams["fill"] == (124, 116, 104)


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("name", GEOMETRIC)
def test_magnitude_zero_geometric_ops_are_identity(name):
    img = _images(1)[0]
    still = {op.name: op for op in aug.TimmAutoAugment(config_str="rand-m0-p1").ops}[name]
    strong = {op.name: op for op in aug.TimmAutoAugment(config_str="rand-m9-p1").ops}[name]
    random.seed(0)
    out0 = np.asarray(still(autoaug.to_pil(img, "t")), dtype=np.int16)
    out9 = np.asarray(strong(autoaug.to_pil(img, "t")), dtype=np.int16)
    # mean absolute change in grey levels: none at m0, large at m9 on noise images
    assert np.abs(out0 - img).mean() <= 1.0
    assert np.abs(out9 - img).mean() > 20.0


def test_paddle_randaugment_magnitude_zero_is_identity_except_fixed_ops():
    """PaddleClas blackens (posterize 0 bits) or inverts (solarize 0) at magnitude 0; we do not."""
    img = autoaug.to_pil(_images(1)[0], "t")
    ra = aug.RandAugment(magnitude=0)
    for name in ra.OP_NAMES:
        if name in ("AutoContrast", "Equalize", "Invert"):
            continue
        out = np.asarray(autoaug.apply_paddle_op(name, img, ra.level_map[name], ra.fill))
        assert np.array_equal(out, np.asarray(img)), name
    strong = aug.RandAugment(magnitude=10)
    assert strong.level_map["Posterize"] == 4 and strong.level_map["Solarize"] == 0.0


def test_posterize_lut_matches_pillow_and_allows_zero_bits():
    img = autoaug.to_pil(_images(1)[0], "t")
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(autoaug.posterize(img, bits)),
                              np.asarray(ImageOps.posterize(img, bits)))
    assert not np.asarray(autoaug.posterize(img, 0)).any()  # timm Posterize at m0: black


def test_autoaugment_policy_table():
    policy = aug.AutoAugment().policy
    assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
    assert all(0 <= level <= 9 and 0 <= p <= 1 for sub in policy for _, p, level in sub)


def _normalized(shape=(32, 40, 3)):
    return ((_images(1, shape)[0].astype(np.float32) / 255) - 0.45) / 0.225


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_modes_hwc(mode):
    img = _normalized()
    random.seed(3)
    np.random.seed(3)
    out = aug.RandomErasing(EPSILON=1.0, mode=mode, mean=(9.0, 9.0, 9.0))(img)
    assert out.dtype == np.float32 and out.shape == img.shape
    changed = np.any(out != img, axis=2)
    assert changed.any()
    ys, xs = np.nonzero(changed)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    # the erased region is one rectangle of area in [sl, sh] of the image (rounding slack)
    assert changed.sum() >= 0.9 * box and 0.01 * 32 * 40 <= box <= 0.5 * 32 * 40
    if mode == "const":
        assert np.all(out[changed] == 9.0)
    untouched = aug.RandomErasing(EPSILON=0.0, mode=mode)(img)
    assert np.array_equal(untouched, img)


def test_random_erasing_chw_erases_all_channels():
    img = np.ascontiguousarray(_normalized((48, 40, 3)).transpose(2, 0, 1))
    random.seed(5)
    out = aug.RandomErasing(EPSILON=1.0, mode="const", mean=(7.0, 7.0, 7.0), sl=0.1, sh=0.2)(img)
    assert out.shape == (3, 48, 40)
    erased = out == 7.0
    assert erased.any() and np.array_equal(erased[0], erased[1]) and np.array_equal(erased[0], erased[2])
    assert 0.05 * 48 * 40 <= erased[0].sum() <= 0.3 * 48 * 40


def test_random_erasing_errors():
    with pytest.raises(ConfigError, match="RandomErasing.mode"):
        aug.RandomErasing(mode="noise")
    with pytest.raises(ConfigError, match="RandomErasing.sl"):
        aug.RandomErasing(sl=0.5, sh=0.4)
    with pytest.raises(ValueError, match="after NormalizeImage"):
        random.seed(0)
        aug.RandomErasing(EPSILON=1.0, mode="pixel")(_images(1)[0])


@pytest.mark.parametrize("length, dtype", [(10, np.uint8), (15, np.float32), (200, np.uint8)])
def test_cutout_zero_area_is_clipped_box(length, dtype):
    img = (_images(1)[0] // 2 + 1).astype(dtype)  # no zeros to begin with
    h, w = img.shape[:2]
    for seed in range(5):
        np.random.seed(seed)
        cy, cx = np.random.randint(h), np.random.randint(w)  # the op's draws, in its order
        y1, y2, x1, x2 = aug.cutout_box(cy, cx, length, h, w)
        out = _seeded(aug.Cutout(n_holes=1, length=length), img, seed)
        assert out.dtype == dtype and out.shape == img.shape
        zero = np.all(out == 0, axis=2)
        assert zero.sum() == (y2 - y1) * (x2 - x1) == zero[y1:y2, x1:x2].sum()
        assert min(y2 - y1, x2 - x1) <= length // 2 * 2


def test_color_jitter_zero_is_identity_and_validates():
    op = aug.ColorJitter()
    for img in _images(3):
        assert np.array_equal(op(img), img)
    assert np.array_equal(aug.ColorJitter(brightness=0.5, p=0.0)(_images(1)[0]), _images(1)[0])
    random.seed(0)
    bright = aug.ColorJitter(brightness=[1.5, 1.5])(_images(1)[0])
    assert bright.dtype == np.uint8 and bright.mean() > _images(1)[0].mean() + 10
    with pytest.raises(ConfigError, match="ColorJitter.hue"):
        aug.ColorJitter(hue=0.7)
    with pytest.raises(ConfigError, match="ColorJitter.brightness"):
        aug.ColorJitter(brightness=-0.1)


def test_policy_ops_reject_float_images():
    with pytest.raises(ValueError, match="before NormalizeImage"):
        aug.TimmAutoAugment()(_normalized())


# ---------------------------------------------------------------- ops PaddleClas configs use

def test_timm_autoaugment_prob_zero_is_identity_and_one_draw_per_image():
    img = _images(1)[0]
    off = aug.TimmAutoAugment(config_str="rand-m9-mstd0.5-inc1", prob=0.0)
    random.seed(0)
    np.random.seed(0)
    assert off(img) is img  # PULC configs switch the policy off with prob: 0.0
    on = aug.TimmAutoAugment(config_str="rand-m9-mstd0.5-inc1", prob=1.0)
    assert any(not np.array_equal(_seeded(on, img, s), img) for s in range(3))
    with pytest.raises(ConfigError, match="TimmAutoAugment.prob"):
        aug.TimmAutoAugment(prob=1.5)


def test_cutout_fill_value_constant_and_random_colour():
    img = np.full((20, 20, 3), 7, np.uint8)
    out = _seeded(aug.Cutout(n_holes=1, length=8, fill_value=[1, 2, 3]), img, 0)
    hole = np.all(out != 7, axis=2)
    assert hole.any() and set(map(tuple, out[hole])) == {(1, 2, 3)}
    default = _seeded(aug.Cutout(n_holes=1, length=8), img, 0)
    np.testing.assert_array_equal(np.all(default == 0, axis=2), hole)  # same box, zeros
    colour = _seeded(aug.Cutout(n_holes=1, length=8, fill_value="none"), img, 0)
    assert len(set(map(tuple, colour[hole]))) == 1  # one random colour for the whole hole
    with pytest.raises(ConfigError, match="Cutout.fill_value"):
        aug.Cutout(fill_value="black")


def _gridmask_reference(h, w, d1, d2, ratio, mode, rotate):
    """GridMask's mask written out again, from the paper's description, to check the op."""
    hh, ww = int(1.5 * h), int(1.5 * w)
    d = np.random.randint(d1, d2)
    band = int(d * ratio + 0.5)
    st_h, st_w = np.random.randint(d), np.random.randint(d)
    rows = np.ones(hh, bool)
    cols = np.ones(ww, bool)
    for start in range(-d + st_h, hh, d):
        rows[max(start, 0):max(start + band, 0)] = False
    for start in range(-d + st_w, ww, d):
        cols[max(start, 0):max(start + band, 0)] = False
    np.random.randint(rotate)
    mask = (rows[:, None] & cols[None, :]).astype(np.float32)
    top, left = (hh - h) // 2, (ww - w) // 2
    mask = mask[top:top + h, left:left + w]
    return 1 - mask if mode == 1 else mask


@pytest.mark.parametrize("mode", [0, 1])
def test_gridmask_masks_height_and_width_of_an_hwc_image(mode):
    img = np.ones((40, 56, 3), np.float32)
    op = aug.GridMask(d1=8, d2=20, rotate=1, ratio=0.5, mode=mode, prob=1.0)
    np.random.seed(3)
    out = op(img)
    np.random.seed(3)
    np.random.rand()  # the op's probability draw
    want = _gridmask_reference(40, 56, 8, 20, 0.5, mode, 1)
    np.testing.assert_array_equal(out[..., 0], want)
    assert np.array_equal(out[..., 0], out[..., 2])  # same mask on every channel
    assert 0 < want.mean() < 1
    chw = aug.GridMask(d1=8, d2=20, mode=mode)
    np.random.seed(3)
    np.testing.assert_array_equal(chw(img.transpose(2, 0, 1))[0], want)


def test_gridmask_prob_and_bad_values():
    img = np.ones((16, 16, 3), np.float32)
    assert aug.GridMask(d1=4, d2=8, prob=0.0)(img) is img
    with pytest.raises(ConfigError, match="GridMask.d1"):
        aug.GridMask(d1=10, d2=5)


def test_hide_and_seek_hides_whole_cells_with_half_probability():
    img = np.ones((64, 96, 3), np.float32)
    hidden, cells = 0, 0
    for seed in range(30):
        np.random.seed(seed)
        random.seed(seed)
        out = aug.HideAndSeek()(img)
        np.random.seed(seed)
        grid = int(np.random.choice(aug.HideAndSeek.GRID_SIZES))
        if grid == 0:
            assert out is img
            continue
        for y in range(0, 64, grid):
            for x in range(0, 96, grid):
                cell = out[y:y + grid, x:x + grid]
                assert cell.min() == cell.max()  # a cell is hidden whole or not at all
                hidden += int(cell.max() == 0)
                cells += 1
    assert img.min() == 1  # the input is untouched
    assert 0.4 < hidden / cells < 0.6


def test_pca_lighting_adds_one_rgb_shift_per_image():
    img = np.full((6, 7, 3), 100, np.uint8)
    np.random.seed(0)
    out = aug.PCALighting()(img)
    np.random.seed(0)
    alpha = np.random.normal(0, 0.1, size=3).astype(np.float32)
    eigval = np.array([0.2175, 0.0188, 0.0045], np.float32)
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)
    shift = eigvec @ (alpha * eigval)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out - 100.0, np.broadcast_to(shift, out.shape), atol=2e-5)  # float32 ulp at 100


def test_random_rot90_label_is_the_number_of_quarter_turns():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    op = aug.RandomRot90()
    seen = set()
    for seed in range(20):
        random.seed(seed)
        out, k = op.labelled(img)
        np.testing.assert_array_equal(out, np.rot90(img, k))
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_blur_image_label_says_whether_it_blurred():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    op = aug.BlurImage(ratio=0.5)
    labels = []
    for seed in range(30):
        random.seed(seed)
        np.random.seed(seed)
        out, label = op.labelled(img)
        labels.append(label)
        assert out.dtype == np.uint8 and out.shape == img.shape
        # blurring lowers the high-frequency energy of a noise image; no blur keeps it
        energy = np.abs(np.diff(out.astype(np.float32), axis=1)).mean()
        base = np.abs(np.diff(img.astype(np.float32), axis=1)).mean()
        assert (energy < 0.8 * base) if label else np.array_equal(out, img)
    assert 0 < sum(labels) < 30
    assert aug.BlurImage(ratio=0.0).labelled(img) == (img, 0)


def test_color_jitter_takes_paddleclas_prob_spelling():
    img = _images(1)[0]
    assert aug.ColorJitter(brightness=0.4, prob=0.0)(img) is img
    assert aug.ColorJitter(brightness=0.4, prob=2).p == 1.0  # PaddleClas's default: always
    with pytest.raises(ConfigError, match="ColorJitter.p"):
        aug.ColorJitter(prob=-1)
