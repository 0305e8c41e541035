"""Honest scores: temperature fit, ECE, and their place in the export (inference.yml, Predictor),
plus the export certificate (engine/certify.py)."""
import json

import numpy as np
import paddle
import pytest
import yaml

from ppcls_ft.calibration import (calibration_report, expected_calibration_error, fit_temperature,
                                  nll, softmax)
from ppcls_ft.engine.export import export_dygraph, export_model_with_config
from ppcls_ft.errors import ConfigError, ExportError
from ppcls_ft.predictor import Predictor
from test_export import EVAL_OPS, SHAPE
from test_service import ColourNet


def overconfident(n=4000, k=5, true_t=1.0, scale=3.0, seed=0):
    """Labels drawn from softmax(z / true_t); the 'model' reports z * scale, i.e. logits whose
    best temperature is scale * true_t."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal([n, k]) * 2.0
    p = softmax(z, true_t)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return z * scale, labels


def test_fit_recovers_the_temperature_that_made_the_data():
    logits, labels = overconfident(scale=3.0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.08)
    # It is the minimum: nudging T either way raises the NLL.
    assert nll(logits, labels, t) < min(nll(logits, labels, t * 0.9), nll(logits, labels, t * 1.1))
    under, labels2 = overconfident(scale=0.5, seed=1)
    assert fit_temperature(under, labels2) == pytest.approx(0.5, rel=0.08)


def test_ece_on_hand_made_bins():
    # Two images at confidence 0.9 (one right: accuracy 0.5) and two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # bins of width 1/15: |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_calibration_lowers_ece_and_keeps_top1():
    logits, labels = overconfident(scale=3.0)
    rep = calibration_report(logits, labels)
    assert rep["ece_before"] > 0.1 and rep["ece_after"] < rep["ece_before"] / 3
    assert rep["ece_after_crossfit"] < rep["ece_before"] / 3
    assert rep["nll_after"] < rep["nll_before"]
    assert np.array_equal(softmax(logits).argmax(1), softmax(logits, rep["temperature"]).argmax(1))


def labelled_batches(n=48, seed=0):
    """Images whose label is a noisy function of their mean colour, so ColourNet is right most of
    the time but, with logits ×3, over-confident."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal([n] + SHAPE).astype(np.float32) * 0.3
    shift = rng.standard_normal([n, 3]).astype(np.float32)
    x += shift[:, :, None, None]
    labels = np.where(rng.random(n) < 0.75, shift.argmax(1), rng.integers(0, 3, n))
    return [(x[:20], labels[:20]), (x[20:], labels[20:])], f"{n} labelled test images"


class SharpColourNet(ColourNet):
    def forward(self, x):
        return super().forward(x) * 6.0


def test_export_calibrates_stores_and_the_predictor_applies_it(tmp_path):
    model = SharpColourNet()
    out = export_dygraph(model, tmp_path, SHAPE, EVAL_OPS, ["r", "g", "b"], certify_on=labelled_batches(),
                         calibrate=True, reject_threshold=0.5)
    info = yaml.safe_load((out / "inference.yml").read_text())
    cal = info["Calibration"]
    assert cal["temperature"] > 1.5  # over-confident model -> T > 1
    assert cal["ece_after"] < cal["ece_before"] and cal["fitted_on"] == 48
    assert info["Reject"]["threshold"] == 0.5
    x = labelled_batches()[0][0][0]
    with paddle.no_grad():
        logits = model(paddle.to_tensor(x)).numpy()
    predictor = Predictor(out, cpu_threads=1)
    # The Predictor reports softmax(logits / T), not the graph's plain softmax.
    np.testing.assert_allclose(predictor.predict_arrays(x), softmax(logits, cal["temperature"]), atol=1e-5)
    np.testing.assert_allclose(predictor.run_graph(x), softmax(logits), atol=1e-5)
    assert predictor.postprocess.reject_threshold == 0.5
    cert = json.loads((out / "export_certificate.json").read_text())
    assert cert["passed"] and cert["samples"] == 48 and cert["top1_agreement"] == 1.0
    assert cert["max_abs_prob_diff"] < 1e-5 and cert["inputs"] == "48 labelled test images"


def test_calibration_without_labels_is_an_error_before_exporting(tmp_path):
    with pytest.raises(ConfigError, match="Export.calibrate.*DataLoader.Eval"):
        export_dygraph(ColourNet(), tmp_path / "m", SHAPE, EVAL_OPS, calibrate=True)
    assert not (tmp_path / "m").exists()


def test_a_disagreeing_export_is_an_error_with_a_failed_certificate(tmp_path, monkeypatch):
    real = Predictor.run_graph

    def skewed(self, batch):  # what a broken engine would answer: mass moved to class 0
        p = real(self, batch)
        p[:, 0] += 0.05
        return p / p.sum(axis=1, keepdims=True)

    monkeypatch.setattr(Predictor, "run_graph", skewed)
    with pytest.raises(ExportError, match=r"export_certificate.json.*largest probability difference"):
        export_dygraph(ColourNet(), tmp_path, SHAPE, EVAL_OPS)
    cert = json.loads((tmp_path / "export_certificate.json").read_text())
    assert cert["passed"] is False and cert["max_abs_prob_diff"] > 0.01 and cert["problems"]


def test_export_config_certifies_on_the_eval_set_and_calibrates(tmp_path, tiny_dataset):
    from ppcls_ft import build_model
    from ppcls_ft.config import validate_config
    root, train_list, _ = tiny_dataset
    ops = [{"DecodeImage": {"to_rgb": True}}, {"ResizeImage": {"size": 32}},
           {"NormalizeImage": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "order": ""}}]
    cfg = {"Global": {"image_shape": [3, 32, 32], "save_inference_dir": str(tmp_path / "inf")},
           "Arch": {"name": "ResNet18", "class_num": 3},
           "DataLoader": {"Eval": {"dataset": {"name": "ImageNetDataset", "image_root": str(root),
                                               "cls_label_path": str(train_list), "transform_ops": ops},
                                   "sampler": {"name": "DistributedBatchSampler", "batch_size": 5,
                                               "shuffle": False},
                                   "loader": {"num_workers": 0, "use_shared_memory": False}}},
           "Export": {"calibrate": True, "certify_samples": 10}}
    validate_config(cfg)
    out = export_model_with_config(build_model({"name": "ResNet18", "class_num": 3}), cfg)
    cert = json.loads((out / "export_certificate.json").read_text())
    assert cert["samples"] == 10 and cert["inputs"].startswith("DataLoader.Eval: the first 10 of 12")
    info = yaml.safe_load((out / "inference.yml").read_text())
    assert info["Calibration"]["fitted_on"] == 10 and info["Calibration"]["ece_bins"] == 15
    with pytest.raises(ConfigError, match="Export.reject_threshold"):
        validate_config({**cfg, "Export": {"reject_threshold": 2}})
    with pytest.raises(ConfigError, match="Export.calibrat"):
        validate_config({**cfg, "Export": {"calibrat": True}})
