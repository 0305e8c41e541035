"""The engines that run an export, and the choice of the fastest exact one (ppcls_ft/runtimes.py).

The export writes ``inference.onnx`` when paddle2onnx and onnxruntime are installed (``make test``
installs the ``[cpu]`` extra, which has both), certifies ONNX Runtime beside oneDNN on the same
images, times the certified engines and records the fastest per batch size; ``Predictor`` serves
with that record by default.
"""
import json

import numpy as np
import pytest
import yaml

from ppcls_ft.engine.export import export_dygraph
from ppcls_ft.errors import ConfigError, ExportError
from ppcls_ft.models import build_model
from ppcls_ft.predictor import Predictor, load_deploy_config, predictor_from_config
from ppcls_ft import runtimes
from ppcls_ft.runtimes import EnginePlan, fastest, plan_from_spec, time_engines
from test_export import EVAL_OPS, LABELS, SHAPE, dygraph_probs, randomize

pytest.importorskip("paddle2onnx", reason="the [cpu] extra installs paddle2onnx (make test does)")
pytest.importorskip("onnxruntime", reason="the [cpu] extra installs onnxruntime (make test does)")


@pytest.fixture(scope="module")
def model():
    return randomize(build_model({"name": "PPLCNet_x0_25", "class_num": 3}), seed=3)


@pytest.fixture(scope="module")
def auto_export(model, tmp_path_factory):
    """The default export: ONNX written, both engines certified and timed."""
    return export_dygraph(model, tmp_path_factory.mktemp("auto"), SHAPE, EVAL_OPS, LABELS,
                          model_name="PPLCNet_x0_25", serve_batch=4)


def test_plan_serves_a_call_with_the_nearest_measured_batch_size():
    plan = EnginePlan({1: "onnxruntime", 8: "onednn"})
    assert [plan.engine_for(n) for n in (1, 2, 8, 20)] == ["onnxruntime", "onednn", "onednn", "onednn"]
    assert plan.engines == ["onednn", "onnxruntime"]
    assert plan.describe() == "onnxruntime at batch 1, onednn at batch 8"
    assert EnginePlan.single("native").describe() == "native"


def test_another_engine_replaces_onednn_only_when_clearly_faster():
    rates = {"onednn": {1: 100.0, 8: 200.0}, "onnxruntime": {1: 103.0, 8: 300.0}}
    assert fastest(rates) == {1: "onednn", 8: "onnxruntime"}  # 3 % is noise, 50 % is not
    assert fastest({"onednn": {1: 50.0}, "onnxruntime": {1: 40.0}}) == {1: "onednn"}


def test_default_export_certifies_times_and_records_both_engines(model, auto_export):
    assert (auto_export / "inference.onnx").stat().st_size > 1000
    cert = json.loads((auto_export / "export_certificate.json").read_text())
    assert cert["passed"] and set(cert["engines"]) == {"onednn", "onnxruntime"}
    assert all(e["passed"] and e["max_abs_prob_diff"] < 1e-5 for e in cert["engines"].values())
    record = yaml.safe_load((auto_export / "inference.yml").read_text())
    engine = record["Engine"]
    assert engine["certified"] == ["onednn", "onnxruntime"]
    assert set(engine["fastest"]) == {1, 4} and set(engine["fastest"].values()) <= set(engine["certified"])
    assert all(rate > 0 for per in engine["images_per_s"].values() for rate in per.values())
    assert record["Global"]["onnx_file"] == "inference.onnx"


def test_auto_predictor_follows_the_record_and_every_engine_matches_dygraph(model, auto_export):
    spec_fastest = yaml.safe_load((auto_export / "inference.yml").read_text())["Engine"]["fastest"]
    auto = Predictor(auto_export, batch_size=4)
    assert auto.plan.by_batch == spec_fastest
    batch = np.random.default_rng(1).standard_normal([5] + SHAPE).astype(np.float32)
    ref = dygraph_probs(model, batch)
    np.testing.assert_allclose(auto.run_graph(batch), ref, atol=1e-5)  # chunks of 4 and 1
    for engine in ("onnxruntime", "onednn"):
        served = Predictor(auto_export, engine=engine, batch_size=4, cpu_threads=1)
        assert served.engine == engine
        np.testing.assert_allclose(served.run_graph(batch), ref, atol=1e-5)


def test_a_mixed_plan_sends_each_chunk_to_its_engine(model, auto_export, monkeypatch):
    served = Predictor(auto_export, batch_size=4)
    served.plan = EnginePlan({1: "onnxruntime", 4: "onednn"})
    served.runners = {name: Predictor(auto_export, engine=name, batch_size=4).run_graph
                      for name in ("onnxruntime", "onednn")}
    calls = []
    for name, run in list(served.runners.items()):
        served.runners[name] = (lambda n, r: lambda b: calls.append((n, len(b))) or r(b))(name, run)
    batch = np.random.default_rng(2).standard_normal([5] + SHAPE).astype(np.float32)
    np.testing.assert_allclose(served.run_graph(batch), dygraph_probs(model, batch), atol=1e-5)
    assert calls == [("onednn", 4), ("onnxruntime", 1)]


def test_onnx_runtime_that_cannot_start_or_run_is_left_out(model, tmp_path, monkeypatch):
    def refuse(self, *a, **k):
        raise RuntimeError("Unsupported model IR version")

    monkeypatch.setattr(runtimes.OnnxRunner, "__init__", refuse)
    out = export_dygraph(model, tmp_path / "start", SHAPE, EVAL_OPS, LABELS)
    assert not (out / "inference.onnx").exists() and Predictor(out).engine == "onednn"
    assert json.loads((out / "export_certificate.json").read_text())["passed"]
    monkeypatch.undo()

    def crash(self, batch):
        raise RuntimeError("Non-zero status code returned while running Conv node")

    monkeypatch.setattr(runtimes.OnnxRunner, "__call__", crash)
    out = export_dygraph(model, tmp_path / "run", SHAPE, EVAL_OPS, LABELS)
    cert = json.loads((out / "export_certificate.json").read_text())
    assert cert["passed"] and not cert["engines"]["onnxruntime"]["passed"]
    assert "Non-zero status code" in cert["engines"]["onnxruntime"]["problems"][0]
    assert not (out / "inference.onnx").exists() and Predictor(out).engine == "onednn"
    with pytest.raises(ExportError, match="onnxruntime failed.*Non-zero status code.*export_onnx: null"):
        export_dygraph(model, tmp_path / "asked", SHAPE, EVAL_OPS, LABELS, export_onnx=True)
    assert not (tmp_path / "asked" / "inference.onnx").exists()


def test_auto_falls_back_to_onednn_where_onnx_cannot_run(auto_export, tmp_path, monkeypatch):
    plan = EnginePlan({1: "onnxruntime", 8: "onnxruntime"})
    spec = type("Spec", (), {"engines": {"fastest": plan.by_batch}})()
    assert plan_from_spec(spec, auto_export).engines == ["onnxruntime"]
    assert plan_from_spec(spec, tmp_path).engines == ["onednn"]  # no inference.onnx there
    monkeypatch.setattr(runtimes, "onnxruntime_available", lambda: False)
    assert plan_from_spec(spec, auto_export).engines == ["onednn"]
    assert plan_from_spec(type("Old", (), {"engines": None})(), auto_export).engines == ["onednn"]


def test_onnx_engine_without_the_file_names_the_fix(model, tmp_path):
    out = export_dygraph(model, tmp_path / "m", SHAPE, EVAL_OPS, LABELS, export_onnx=False)
    assert not (out / "inference.onnx").exists()
    assert yaml.safe_load((out / "inference.yml").read_text())["Engine"] == {"certified": ["onednn"]}
    assert Predictor(out).engine == "onednn"
    with pytest.raises(ConfigError, match="inference.onnx.*export_onnx=True"):
        Predictor(out, engine="onnxruntime")
    with pytest.raises(ConfigError, match="engine: must be one of auto, onednn"):
        Predictor(out, engine="tensorrt")


def test_an_onnx_file_that_disagrees_is_never_served(model, tmp_path, monkeypatch, caplog):
    true_call = runtimes.OnnxRunner.__call__

    def skewed(self, batch):  # an ONNX graph that predicts something else
        return true_call(self, batch)[:, ::-1].copy()

    monkeypatch.setattr(runtimes.OnnxRunner, "__call__", skewed)
    out = export_dygraph(model, tmp_path / "auto", SHAPE, EVAL_OPS, LABELS)  # auto: dropped, logged
    assert not (out / "inference.onnx").exists()
    cert = json.loads((out / "export_certificate.json").read_text())
    assert cert["passed"] and not cert["engines"]["onnxruntime"]["passed"]
    assert cert["max_abs_prob_diff"] == cert["engines"]["onednn"]["max_abs_prob_diff"] < 1e-5
    assert yaml.safe_load((out / "inference.yml").read_text())["Engine"] == {"certified": ["onednn"]}
    assert Predictor(out).engine == "onednn"
    with pytest.raises(ExportError, match="onnxruntime: largest probability difference.*export_onnx: null"):
        export_dygraph(model, tmp_path / "asked", SHAPE, EVAL_OPS, LABELS, export_onnx=True)
    assert not (tmp_path / "asked" / "inference.onnx").exists()  # no uncertified graph left


def test_time_engines_interleaves_and_measures_every_size():
    calls = []
    runners = {"a": lambda b: calls.append(("a", len(b))), "b": lambda b: calls.append(("b", len(b)))}
    rates = time_engines(runners, [3, 4, 4], [1, 2], budget_s=0.01)
    assert set(rates) == {"a", "b"} and all(set(r) == {1, 2} for r in rates.values())
    firsts = [c for c in calls if c[1] == 1]
    assert firsts[:2] == [("a", 1), ("b", 1)]  # warm-up of each, then rounds in turn
    assert {c[0] for c in calls} == {"a", "b"}


def test_deploy_config_chooses_the_engine(auto_export, tmp_path):
    cfg_file = tmp_path / "deploy.yaml"
    cfg_file.write_text(yaml.safe_dump({"Global": {"inference_model_dir": str(auto_export),
                                                   "infer_imgs": "x.jpg", "engine": "onnxruntime"}}))
    assert predictor_from_config(load_deploy_config(cfg_file)).engine == "onnxruntime"
    cfg = load_deploy_config(cfg_file, ["Global.engine=native"])
    assert predictor_from_config(cfg).engine == "native"
