"""Mixup / Cutmix / OpSampler numerics (COMPAT §3), seeding, resume state, config errors."""
import numpy as np
import paddle
import pytest

from ppcls_ft.data.batch_ops import CutmixOperator, MixupOperator, build_batch_op
from ppcls_ft.errors import ConfigError

K = 5


def _batch(n=6, h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 3, h, w)).astype(np.float32)
    labels = rng.integers(0, K, n).astype(np.int64)
    return images, labels


def _onehot(labels):
    return np.eye(K, dtype=np.float32)[labels]


def test_mixup_pixel_formula_and_targets():
    images, labels = _batch()
    images_t = paddle.to_tensor(images)
    op = MixupOperator(class_num=K, alpha=0.4)
    op.seed(0)
    out, targets = op(images_t, paddle.to_tensor(labels))
    lam, t = op.last_lam, targets.numpy()
    assert 0.0 <= lam <= 1.0
    assert targets.shape == [6, K] and targets.dtype == paddle.float32
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    # Every output row is lam*x_i + (1-lam)*x_j for the j its target names.
    out = out.numpy()
    for i in range(6):
        matches = [j for j in range(6)
                   if np.allclose(out[i], lam * images[i] + (1 - lam) * images[j], atol=1e-5)]
        assert matches, f"row {i} is not a mixup of two batch rows"
        j = matches[0]
        np.testing.assert_allclose(t[i], lam * _onehot(labels[i]) + (1 - lam) * _onehot(labels[j]),
                                   atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lam_equals_pasted_area(seed):
    images, labels = _batch(n=4, h=12, w=10, seed=seed)
    op = CutmixOperator(class_num=K, alpha=1.0)
    op.seed(seed)
    out, targets = op(paddle.to_tensor(images), paddle.to_tensor(labels))
    out = out.numpy()
    x1, y1, x2, y2 = op.last_box
    changed = np.zeros((12, 10), bool)
    for i in range(4):
        changed |= (out[i] != images[i]).any(0)
    inside = np.zeros((12, 10), bool)
    inside[y1:y2, x1:x2] = True
    assert not (changed & ~inside).any()  # nothing outside the box changed
    lam, t = op.last_lam, targets.numpy()
    assert 0.0 <= lam <= 1.0
    assert lam == pytest.approx(1 - inside.sum() / (12 * 10), abs=1e-12)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    # Inside the box each row holds one source image's pixels; its target names that source.
    for i in range(4):
        sources = [j for j in range(4) if np.array_equal(out[i][:, inside], images[j][:, inside])]
        assert sources, f"row {i}: box pixels come from no batch image"
        expect = lam * _onehot(labels[i]) + (1 - lam) * _onehot(labels[sources[0]])
        np.testing.assert_allclose(t[i], expect, atol=1e-6)


def test_same_seed_same_output_and_resume_state():
    images, labels = _batch()
    a, b = CutmixOperator(class_num=K), CutmixOperator(class_num=K)
    a.seed(11)
    b.seed(11)
    xa, ta = a(paddle.to_tensor(images), paddle.to_tensor(labels))
    xb, tb = b(paddle.to_tensor(images), paddle.to_tensor(labels))
    np.testing.assert_array_equal(xa.numpy(), xb.numpy())
    np.testing.assert_array_equal(ta.numpy(), tb.numpy())
    state = a.state_dict()
    first = a(paddle.to_tensor(images), paddle.to_tensor(labels))[0].numpy()
    a.set_state_dict(state)
    again = a(paddle.to_tensor(images), paddle.to_tensor(labels))[0].numpy()
    np.testing.assert_array_equal(first, again)


def test_op_sampler_frequencies_and_hard_labels():
    images, labels = _batch(n=4, h=6, w=6)
    op = build_batch_op([{"OpSampler": {"MixupOperator": {"alpha": 0.8, "prob": 0.3},
                                        "CutmixOperator": {"alpha": 1.0, "prob": 0.5}}}],
                        class_num=K, path="DataLoader.Train.dataset.batch_transform_ops")
    op.seed(5)
    picks = {"MixupOperator": 0, "CutmixOperator": 0, "none": 0}
    n = 400
    for _ in range(n):
        x, t = op(paddle.to_tensor(images), paddle.to_tensor(labels))
        picks[op.last_op] += 1
        if op.last_op == "none":
            np.testing.assert_array_equal(t.numpy(), labels)
            assert op.last_lam == 1.0
        else:
            assert t.shape == [4, K]
    for name, p in (("MixupOperator", 0.3), ("CutmixOperator", 0.5), ("none", 0.2)):
        assert abs(picks[name] / n - p) < 0.07, picks

    def run(steps):
        out = []
        for _ in range(steps):
            op(paddle.to_tensor(images), paddle.to_tensor(labels))
            out.append((op.last_op, op.last_lam))
        return out

    state = op.state_dict()
    seq = run(10)
    op.set_state_dict(state)
    assert run(10) == seq  # resume reproduces both the op choice and lam


def test_labels_n_by_1_accepted():
    images, labels = _batch()
    op = MixupOperator(class_num=K)
    op.seed(0)
    _, t = op(paddle.to_tensor(images), paddle.to_tensor(labels.reshape(-1, 1)))
    assert t.shape == [6, K]


def test_build_batch_op_errors():
    path = "DataLoader.Train.dataset.batch_transform_ops"
    assert build_batch_op(None, class_num=K) is None
    with pytest.raises(ConfigError, match="Arch.class_num"):
        build_batch_op([{"MixupOperator": {"alpha": 0.2}}], class_num=None, path=path)
    with pytest.raises(ConfigError, match=rf"{path}.0.*did you mean 'CutmixOperator'"):
        build_batch_op([{"CutMixOperator": {"alpha": 0.2}}], class_num=K, path=path)
    with pytest.raises(ConfigError, match=rf"{path}.0.OpSampler.MixupOperator.alpah.*'alpha'"):
        build_batch_op([{"OpSampler": {"MixupOperator": {"alpah": 0.2, "prob": 0.5}}}], K, path)
    with pytest.raises(ConfigError, match=rf"{path}.0.OpSampler.*sum to 1.2"):
        build_batch_op([{"OpSampler": {"MixupOperator": {"alpha": 0.2, "prob": 0.6},
                                       "CutmixOperator": {"alpha": 1.0, "prob": 0.6}}}], K, path)
    with pytest.raises(ConfigError, match=rf"{path}.0.OpSampler.CutmixOperator.prob"):
        build_batch_op([{"OpSampler": {"CutmixOperator": {"alpha": 1.0}}}], K, path)
    with pytest.raises(ConfigError, match=rf"{path}.0.MixupOperator: alpha"):
        build_batch_op([{"MixupOperator": {"alpha": 0}}], K, path)
    with pytest.raises(ConfigError, match="use one, or OpSampler"):
        build_batch_op([{"MixupOperator": None}, {"CutmixOperator": None}], K, path)


def test_cutmix_default_alpha_is_paddleclas_0_2():
    assert CutmixOperator(class_num=K).alpha == 0.2
    assert MixupOperator(class_num=K).alpha == 1.0  # PaddleClas's Mixup default
