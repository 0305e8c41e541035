"""inference_format.py: the versioned inference.yml, and the post-processing every reader shares."""
import numpy as np
import pytest
import yaml

from ppcls_ft.errors import ConfigError, DataError
from ppcls_ft.inference_format import (INFER_YML, SCHEMA_VERSION, InferenceSpec, Postprocessor,
                                       Preprocessor, apply_temperature, complete_preprocess,
                                       paddlex_model_name, read_spec, topk_results, write_spec)

OPS = [{"DecodeImage": {"to_rgb": True, "channel_first": False}}, {"ResizeImage": {"size": 8}},
       {"NormalizeImage": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "order": ""}},
       {"ToCHWImage": None}]
# What ppcls_ft 0.1 wrote (and PaddleX writes): no schema_version, no Calibration/Reject.
V1 = {"Global": {"model_name": "PPLCNet_x0_25", "class_num": 3, "image_shape": [3, 8, 8],
                 "input_name": "x", "model_file": "inference.json",
                 "params_file": "inference.pdiparams", "paddle_version": "3.3.1"},
      "PreProcess": {"transform_ops": OPS},
      "PostProcess": {"Topk": {"topk": 2, "label_list": ["a", "b", "c"]}}}


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_version_1_file_reads_with_neutral_postprocessing(tmp_path):
    (tmp_path / INFER_YML).write_text(yaml.safe_dump(V1))
    spec = read_spec(tmp_path)
    assert spec.schema_version == 1
    assert (spec.model_name, spec.class_num, spec.topk, spec.label_list) == ("PPLCNet_x0_25", 3, 2, ["a", "b", "c"])
    assert spec.temperature == 1.0 and spec.reject_threshold is None
    assert spec.extra == {"paddle_version": "3.3.1"}
    # Written again, it becomes the current version and keeps every value.
    write_spec(tmp_path, spec)
    data = yaml.safe_load((tmp_path / INFER_YML).read_text())
    assert data["Global"]["schema_version"] == SCHEMA_VERSION
    assert data["PostProcess"] == V1["PostProcess"] and "Calibration" not in data and "Reject" not in data
    assert read_spec(tmp_path).label_list == ["a", "b", "c"]


def test_calibration_and_reject_round_trip(tmp_path):
    spec = InferenceSpec(transform_ops=OPS, class_num=3, temperature=1.7, reject_threshold=0.6,
                         calibration={"ece_bins": 15, "ece_before": 0.2, "ece_after": 0.05})
    write_spec(tmp_path, spec)
    data = yaml.safe_load((tmp_path / INFER_YML).read_text())
    assert data["Calibration"]["temperature"] == 1.7 and data["Calibration"]["ece_after"] == 0.05
    assert data["Reject"] == {"threshold": 0.6, "class_id": -1, "label_name": "unknown"}
    back = read_spec(tmp_path)
    assert (back.temperature, back.reject_threshold, back.calibration["ece_before"]) == (1.7, 0.6, 0.2)


def test_newer_schema_and_bad_temperature_are_errors(tmp_path):
    data = {**V1, "Global": {**V1["Global"], "schema_version": SCHEMA_VERSION + 1}}
    (tmp_path / INFER_YML).write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"inference.yml: Global.schema_version.*upgrade ppcls_ft"):
        read_spec(tmp_path)
    (tmp_path / INFER_YML).write_text(yaml.safe_dump({**V1, "Calibration": {"temperature": 0}}))
    with pytest.raises(ConfigError, match="Calibration.temperature: must be > 0"):
        read_spec(tmp_path)
    assert read_spec(tmp_path / "nowhere") is None


def test_temperature_on_probabilities_equals_softmax_of_scaled_logits():
    z = np.random.default_rng(0).standard_normal([6, 5]) * 4
    probs = softmax(z).astype(np.float32)
    for t in (0.5, 2.5):
        np.testing.assert_allclose(apply_temperature(probs, t), softmax(z / t), atol=1e-6)
    assert apply_temperature(probs, 1.0) is probs


def test_topk_ties_go_to_the_lower_id_and_names_are_attached():
    probs = np.array([[0.2, 0.4, 0.4], [0.9, 0.05, 0.05]], np.float32)
    res = topk_results(probs, 2, ["a", "b", "c"], ["x.jpg", None])
    assert res[0]["class_ids"] == [1, 2] and res[0]["label_names"] == ["b", "c"]
    assert res[0]["file_name"] == "x.jpg" and "file_name" not in res[1]
    assert topk_results(probs, 9)[1]["class_ids"] == [0, 1, 2]  # k capped at class_num


def test_reject_threshold_answers_unknown_with_the_candidates():
    probs = np.array([[0.5, 0.3, 0.2], [0.8, 0.1, 0.1]], np.float32)
    low, high = Postprocessor(2, ["a", "b", "c"], reject_threshold=0.6)(probs)
    assert low == {"class_ids": [-1], "scores": [pytest.approx(0.5)], "label_names": ["unknown"],
                   "rejected": True, "candidates": {"class_ids": [0, 1], "scores": [pytest.approx(0.5),
                                                    pytest.approx(0.3)], "label_names": ["a", "b"]}}
    assert high["rejected"] is False and high["class_ids"] == [0, 1]
    # The threshold applies to calibrated scores: a high temperature flattens 0.8 below 0.6.
    assert Postprocessor(2, None, temperature=4.0, reject_threshold=0.6)(probs)[1]["rejected"] is True
    with pytest.raises(ConfigError, match="Reject.threshold"):
        Postprocessor(reject_threshold=1.5)


def test_preprocessor_takes_bytes_and_arrays_alike(tmp_path):
    import cv2

    rgb = np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    pre = Preprocessor(OPS)
    np.testing.assert_array_equal(pre(png.tobytes()), pre(rgb))
    assert pre(rgb).shape == (3, 8, 8) and pre(rgb).dtype == np.float32
    with pytest.raises(DataError, match="cannot decode"):
        pre(b"not an image")
    with pytest.raises(DataError, match="cannot read"):
        pre(str(tmp_path / "missing.jpg"))


def test_written_op_list_and_model_name_are_the_ones_paddlex_loads():
    names = lambda ops: [next(iter(op)) for op in ops]  # noqa: E731
    assert names(complete_preprocess(OPS)) == ["ResizeImage", "NormalizeImage", "ToCHWImage"]
    bgr = [{"DecodeImage": {"to_rgb": False}}] + OPS[1:3]
    assert names(complete_preprocess(bgr)) == ["DecodeImage", "ResizeImage", "NormalizeImage", "ToCHWImage"]
    assert [paddlex_model_name(a) for a in ("PPLCNet_x0_25", "MobileNetV2", "MobileNetV2_x0_5", "ResNet50_vd")] \
        == ["PP-LCNet_x0_25", "MobileNetV2_x1_0", "MobileNetV2_x0_5", "ResNet50_vd"]
