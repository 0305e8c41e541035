"""Per-class results (eval_results.json, confusion matrix), report.html, early stopping."""
import json

import numpy as np
import pytest

from ppcls_ft.engine.analysis import ClassStats
from ppcls_ft.engine.diagnosis import early_stop
from ppcls_ft.engine.run import evaluate_config, train
from test_trainer import make_cfg


def test_class_stats_by_hand():
    s = ClassStats(3)
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.6, .3, .1], [.1, .2, .7], [.1, .8, .1]])
    labels = np.array([0, 1, 1, 2, 2])
    s.update(probs, labels, indices=[10, 11, 12, 13, 14])
    assert s.confusion.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    res = s.results(["a", "b", "c"], paths=[f"img{i}.jpg" for i in range(15)])
    pc = {r["name"]: r for r in res["per_class"]}
    assert pc["a"]["precision"] == pytest.approx(0.5) and pc["a"]["recall"] == 1.0
    assert pc["b"]["precision"] == pytest.approx(0.5) and pc["b"]["recall"] == pytest.approx(0.5)
    assert pc["c"]["precision"] == 1.0 and pc["c"]["recall"] == pytest.approx(0.5)
    assert pc["c"]["f1"] == pytest.approx(2 / 3) and pc["b"]["support"] == 2
    assert res["top1"] == pytest.approx(0.6) and res["images"] == 5
    assert res["macro_avg"]["recall"] == pytest.approx((1 + .5 + .5) / 3)
    assert res["weighted_avg"]["recall"] == pytest.approx((1 * 1 + .5 * 2 + .5 * 2) / 5)
    # the most confident mistake first: index 14 (c predicted b at 0.8), then 12 (b as a, 0.6)
    wrong = res["most_confident_wrong"]
    assert [w["index"] for w in wrong] == [14, 12] and wrong[0]["path"] == "img14.jpg"
    assert wrong[0]["true"]["name"] == "c" and wrong[0]["predicted"]["name"] == "b"
    assert {(p["true"]["name"], p["predicted"]["name"]) for p in res["most_confused"]} == {
        ("b", "a"), ("c", "b")}


def test_training_writes_per_class_results_and_a_report(tmp_path, tiny_dataset):
    result = train(make_cfg(tmp_path, tiny_dataset, name="run", epochs=2))
    out = tmp_path / "run"
    data = json.loads((out / "eval_results.json").read_text())
    assert {"top1", "per_class", "confusion_matrix"} <= set(data)
    assert data["epoch"] == result["best_epoch"]
    assert data["top1"] == pytest.approx(result["best_top1"])
    cm = np.array(data["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.dtype.kind == "i" and cm.sum() == 12
    assert [r["name"] for r in data["per_class"]] == ["class0", "class1", "class2"]  # label_list.txt
    assert [r["support"] for r in data["per_class"]] == cm.sum(axis=1).tolist()
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # curves + confusion matrix, embedded
    assert "Diagnosis:" in page and "class1" in page and "Per class" in page
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    assert page.count("<figure>") == len(data["most_confident_wrong"])


def test_report_gallery_shows_the_confidently_wrong_images(tiny_dataset):
    from ppcls_ft.engine.report import build_report
    root, lst, _ = tiny_dataset
    paths = [str(root / line.split()[0]) for line in lst.read_text().splitlines()]
    s = ClassStats(3)
    s.update(np.array([[.1, .9, 0.], [.3, .3, .4], [1., 0., 0.]]), np.array([0, 0, 0]), [0, 1, 2])
    res = s.results(["cat", "dog", "owl"], paths)
    page = build_report("t", [{"epoch": 1, "train_loss": 1.0, "eval_top1": 0.3, "lr": 0.1}],
                        {"verdict": "good_fit", "reason": "r", "advice": []}, res)
    assert page.count("<figure>") == 2 and page.count("data:image/png;base64,") == 2 + 2
    assert page.index("predicted <b>dog</b> (0.90)") < page.index("predicted <b>owl</b> (0.40)")
    assert paths[0] in page and paths[1] in page


def test_eval_tool_writes_eval_results(tmp_path, tiny_dataset):
    train(make_cfg(tmp_path, tiny_dataset, name="run", epochs=1,
                   overrides=["Optimizer.lr.warmup_epoch=0"]))
    cfg = make_cfg(tmp_path, tiny_dataset, name="ev", epochs=1, overrides=[
        f"Global.pretrained_model={tmp_path / 'run' / 'latest'}"])
    metrics = evaluate_config(cfg)
    data = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert data["top1"] == pytest.approx(metrics["top1"]) and data["images"] == 12
    assert metrics["confusion_matrix"] == data["confusion_matrix"]


def test_early_stop_rule():
    h = [{"epoch": e, "eval_top1": v} for e, v in enumerate([0.5, 0.6, 0.605, 0.59, 0.6], 1)]
    assert early_stop(h, {}) is None
    assert early_stop(h, {"early_stop_patience": 4}) is None
    assert early_stop(h, {"early_stop_patience": 3}) is None  # 0.605 > 0.6 reset the count
    msg = early_stop(h, {"early_stop_patience": 3, "early_stop_min_delta": 0.01})
    assert "over 0.6000 (epoch 2) in 3 evaluations" in msg


def test_early_stopping_keeps_the_best_model_and_says_why(tmp_path, tiny_dataset):
    # lr 0: nothing improves after the first evaluation, so patience 1 stops after epoch 2
    result = train(make_cfg(tmp_path, tiny_dataset, name="es", epochs=5, overrides=[
        "Optimizer.lr.learning_rate=0.0", "Optimizer.lr.warmup_epoch=0",
        "Global.early_stop_patience=1"]))
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert result["stopped_early"] and result["best_epoch"] == 1
    assert result["diagnosis"]["reason"].startswith("stopped early: val top-1 did not improve")
    data = json.loads((tmp_path / "es" / "train_results.json").read_text())
    assert data["stopped_early"] == result["stopped_early"]
    assert "Stopped early" in (tmp_path / "es" / "report.html").read_text()


def test_the_readme_python_api_example_runs(tmp_path, capsys):
    """The README's notebook example, as written, with its output folder moved to tmp_path."""
    import re
    from conftest import REPO
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert code.count('"configs/demo.yaml"') == 3 and "output/api" in code
    code = code.replace("output/api", f"{tmp_path}/api")
    code = code.replace('"configs/demo.yaml"', f'"{REPO}/configs/demo.yaml"')
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "recall" in out and "'class_ids'" in out and "'label_names'" in out
    assert (tmp_path / "api" / "report.html").is_file()
    assert json.loads((tmp_path / "api" / "eval_results.json").read_text())["images"] == 16
