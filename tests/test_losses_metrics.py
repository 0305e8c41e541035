"""CELoss (label smoothing, soft targets, class weights), build_loss, TopkAcc, build_metrics."""
import logging

import numpy as np
import paddle
import pytest

from ppcls_ft.errors import ConfigError
from ppcls_ft.losses import CELoss, build_loss, class_weights_from_counts
from ppcls_ft.metrics import build_metrics

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(4, 3)).astype("float32")
LABELS = np.array([0, 2, 1, 2])


def log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ce(q, z):
    return -(q * log_softmax(z)).sum(axis=1)


def loss_of(layer, logits, target):
    return float(layer(paddle.to_tensor(logits), paddle.to_tensor(target))["CELoss"])


@pytest.mark.parametrize("shape", [(4,), (4, 1)])
def test_hard_labels_with_label_smoothing(shape):
    eps, k = 0.1, 3
    q = np.eye(k)[LABELS] * (1 - eps) + eps / k
    want = ce(q, LOGITS).mean()
    assert loss_of(CELoss(epsilon=eps), LOGITS, LABELS.reshape(shape)) == pytest.approx(want, rel=1e-5)


def test_hard_labels_without_smoothing_is_plain_cross_entropy():
    want = -log_softmax(LOGITS)[np.arange(4), LABELS].mean()
    assert loss_of(CELoss(), LOGITS, LABELS) == pytest.approx(want, rel=1e-5)


def test_soft_targets_are_used_as_given_not_softmaxed():
    t = np.array([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]], "float32")
    got = loss_of(CELoss(), LOGITS, t)
    assert got == pytest.approx(ce(t, LOGITS).mean(), rel=1e-5)
    softmaxed = np.exp(t) / np.exp(t).sum(axis=1, keepdims=True)  # the PaddleClas defect
    assert abs(got - ce(softmaxed, LOGITS).mean()) > 1e-3
    eps = 0.2
    smoothed = loss_of(CELoss(epsilon=eps), LOGITS, t)
    assert smoothed == pytest.approx(ce(t * (1 - eps) + eps / 3, LOGITS).mean(), rel=1e-5)


def test_class_weight_hard_and_soft():
    w = np.array([1.0, 3.0, 0.5])
    per = ce(np.eye(3)[LABELS], LOGITS)
    want = (w[LABELS] * per).sum() / w[LABELS].sum()
    assert loss_of(CELoss(class_weight=list(w)), LOGITS, LABELS) == pytest.approx(want, rel=1e-5)
    t = np.array([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]], "float32")
    ws = (t * w).sum(axis=1)
    eps = 0.1
    per = ce(t * (1 - eps) + eps / 3, LOGITS)  # weights use the unsmoothed target
    want = (ws * per).sum() / ws.sum()
    got = loss_of(CELoss(epsilon=eps, class_weight=list(w)), LOGITS, t)
    assert got == pytest.approx(want, rel=1e-5)


def test_class_weight_length_mismatch_names_the_config_path():
    loss = build_loss([{"CELoss": {"class_weight": [1.0, 2.0]}}], "Loss.Train")
    with pytest.raises(ValueError, match=r"Loss\.Train\.0\.CELoss\.class_weight"):
        loss(paddle.to_tensor(LOGITS), paddle.to_tensor(LABELS))


def test_lone_loss_weight_is_ignored_like_paddleclas_and_logged(caplog):
    from ppcls_ft import config as C
    C._warned.discard("Loss.Train.0.CELoss.weight")
    logger = logging.getLogger("ppcls_ft")
    logger.addHandler(caplog.handler)
    try:
        loss = build_loss([{"CELoss": {"weight": 0.5, "epsilon": 0.1}}], "Loss.Train")
    finally:
        logger.removeHandler(caplog.handler)
    assert "Loss.Train.0.CELoss.weight" in caplog.text and "no effect" in caplog.text
    logits = paddle.to_tensor(LOGITS, stop_gradient=False)
    out = loss(logits, paddle.to_tensor(LABELS))
    assert set(out) == {"CELoss", "loss"}
    assert float(out["loss"]) == pytest.approx(float(out["CELoss"]), rel=1e-6)
    out["loss"].backward()
    # d(mean CE)/dz = (softmax - q)/N, unweighted
    sm = np.exp(log_softmax(LOGITS))
    q = np.eye(3)[LABELS] * 0.9 + 0.1 / 3
    np.testing.assert_allclose(logits.grad.numpy(), (sm - q) / 4, rtol=1e-4, atol=1e-7)


def test_combined_loss_weights_each_term():
    from ppcls_ft.losses import CombinedLoss

    class Half(paddle.nn.Layer):
        def forward(self, logits, target):
            return {"Half": logits.mean() * 0 + 2.0}

    loss = CombinedLoss([CELoss(), Half()], [0.5, 3.0])
    out = loss(paddle.to_tensor(LOGITS), paddle.to_tensor(LABELS))
    assert float(out["loss"]) == pytest.approx(0.5 * float(out["CELoss"]) + 3.0 * 2.0, rel=1e-6)


def test_build_loss_class_weight_auto_from_counts():
    counts = [10, 30, 60]
    assert class_weights_from_counts(counts) == pytest.approx([100 / (3 * c) for c in counts])
    loss = build_loss([{"CELoss": {"class_weight": "auto"}}], "Loss.Train", class_counts=counts)
    assert loss.terms[0].class_weight == pytest.approx([100 / 30, 100 / 90, 100 / 180])
    with pytest.raises(ConfigError, match=r"Loss\.Train\.0\.CELoss\.class_weight"):
        build_loss([{"CELoss": {"class_weight": "auto"}}], "Loss.Train")


@pytest.mark.parametrize("cfg,key", [
    ([{"CELoss": {"weight": 1.0, "epsilom": 0.1}}], "Loss.Train.0.CELoss.epsilom"),
    ([{"CELoss": {"epsilon": 1.5}}], "Loss.Train.0.CELoss.epsilon"),
    ([{"CELos": {"weight": 1.0}}], "Loss.Train.0.CELos"),
    ([{"CELoss": {"weight": "one"}}], "Loss.Train.0.CELoss.weight"),
    ([], "Loss.Train"),
])
def test_loss_config_errors(cfg, key):
    with pytest.raises(ConfigError) as info:
        build_loss(cfg, "Loss.Train")
    assert info.value.path == key


# ---------------------------------------------------------------------------------- metrics
# Hand-made logits, 4 classes. Ranks of the true class (ties -> lower class id ranks first):
#   s0 label 1: 0.9 is the max                         -> rank 0
#   s1 label 1: ties with class 0 at 0.5, 0 < 1        -> rank 1
#   s2 label 0: ties with class 1 at 0.5, 0 is lower   -> rank 0
#   s3 label 0: smallest of four                       -> rank 3
TIE_LOGITS = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.1, 0.0],
                       [0.5, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]], "float32")
TIE_LABELS = np.array([1, 1, 0, 0])


@pytest.mark.parametrize("labels", [TIE_LABELS, TIE_LABELS.reshape(4, 1)])
def test_topk_with_ties_is_deterministic(labels):
    m = build_metrics([{"TopkAcc": {"topk": [1, 2, 3, 4]}}], "Metric.Eval")
    batch = m.update(paddle.to_tensor(TIE_LOGITS), paddle.to_tensor(labels))
    want = {"top1": 2 / 4, "top2": 3 / 4, "top3": 3 / 4, "top4": 4 / 4}
    assert batch == want
    assert m.accumulate() == want


def test_topk_accumulates_counts_not_batch_averages():
    m = build_metrics([{"TopkAcc": {"topk": [1]}}], "Metric.Eval")
    m.update(TIE_LOGITS[:3], TIE_LABELS[:3])  # 2 of 3 right (s0, s2)
    m.update(TIE_LOGITS[3:], np.array([3]))  # 1 of 1 right
    assert m.accumulate()["top1"] == pytest.approx(3 / 4)  # not (2/3 + 1) / 2
    m.reset()
    m.update(TIE_LOGITS[3:], TIE_LABELS[3:])
    assert m.accumulate() == {"top1": 0.0}


def test_topk_larger_than_class_count_is_clipped_and_kept_as_key(caplog):
    logits = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], "float32")
    m = build_metrics([{"TopkAcc": {"topk": [1, 5]}}], "Metric.Eval")
    with caplog.at_level(logging.INFO, logger="ppcls_ft"):
        m.update(logits, np.array([0, 0]))
        m.update(logits, np.array([0, 0]))
    assert m.accumulate() == {"top1": 0.5, "top5": 1.0}
    assert sum("top5" in r.getMessage() for r in caplog.records) == 1


def test_build_metrics_null_section_and_errors():
    empty = build_metrics(None, "Metric.Train")
    empty.update(TIE_LOGITS, TIE_LABELS)
    assert empty.accumulate() == {} and len(empty) == 0
    with pytest.raises(ConfigError, match=r"Metric\.Eval\.0\.TopkAcc\.topk"):
        build_metrics([{"TopkAcc": {"topk": [0, 5]}}], "Metric.Eval")
    with pytest.raises(ConfigError, match="did you mean 'TopkAcc'"):
        build_metrics([{"TopAcc": {"topk": [1]}}], "Metric.Eval")


def test_every_shared_paddleclas_loss_and_metric_section_builds(shared):
    import yaml

    files = sorted((shared / "paddleclas_configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        for mode in ("Train", "Eval"):
            loss = build_loss(cfg["Loss"][mode], f"Loss.{mode}")
            out = loss(paddle.to_tensor(LOGITS), paddle.to_tensor(LABELS))
            assert np.isfinite(float(out["loss"])), f.name
            metrics = build_metrics(cfg["Metric"].get(mode), f"Metric.{mode}")
            metrics.update(TIE_LOGITS, TIE_LABELS)
            if cfg["Metric"].get(mode):
                assert metrics.accumulate()["top1"] == pytest.approx(0.5), f.name


def _tpr_at_fpr_bruteforce(pos, neg, max_fpr):
    """PaddleClas's loop, written out: thresholds i/10000, best TPR with FPR <= max_fpr."""
    best, best_t = 0.0, None
    for i in range(10000):
        t = i / 10000
        tpr = np.mean(np.asarray(pos) > t)
        fpr = np.mean(np.asarray(neg) > t) if len(neg) else 0.0
        if fpr <= max_fpr and tpr > best:
            best, best_t = tpr, t
    return best, best_t


def test_tpr_at_fpr_matches_the_threshold_sweep():
    from ppcls_ft.metrics import TprAtFpr
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 2)).astype("float32")
    labels = rng.integers(0, 2, 200)
    logits[labels == 1, 1] += 1.5  # positives score higher on average
    metric = TprAtFpr(max_fpr=0.05)
    for lo in range(0, 200, 64):  # batches of 64, 64, 64, 8
        assert metric.update(logits[lo:lo + 64], labels[lo:lo + 64, None]) == {}
    z = logits.astype(np.float64)
    p1 = np.exp(z[:, 1]) / np.exp(z).sum(axis=1)
    want, want_t = _tpr_at_fpr_bruteforce(p1[labels == 1], p1[labels == 0], 0.05)
    got = metric.accumulate()
    assert 0 < want < 1
    assert got["tpr"] == pytest.approx(want) and got["tpr_threshold"] == pytest.approx(want_t)
    metric.reset()
    assert metric.accumulate()["tpr"] == 0.0


def test_tpr_at_fpr_builds_from_pulc_yaml():
    metrics = build_metrics([{"TprAtFpr": None}, {"TopkAcc": {"topk": [1, 2]}}], "Metric.Eval")
    logits = np.array([[0.0, 3.0], [3.0, 0.0], [0.0, 2.0]], "float32")
    metrics.update(logits, np.array([1, 0, 1]))
    out = metrics.accumulate()
    assert out["tpr"] == 1.0 and out["top1"] == 1.0
