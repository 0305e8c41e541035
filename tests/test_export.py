"""Export -> serve round trips: the served model predicts what the trained model predicted.

Covers engine/export.py, predictor.py, tools/export_model.py and deploy/python/predict_cls.py.
Random-init models give near-uniform outputs (PPLCNet's features are ~1e-6 at init), which would
hide a wrong preprocessing or graph, so ``randomize`` gives every tensor He-scaled values first.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml

from ppcls_ft import build_model
from ppcls_ft.data.transforms import build_transforms
from ppcls_ft.engine.export import export_dygraph, export_inference_model, label_names_from_config
from ppcls_ft.errors import ConfigError, WeightsError
from ppcls_ft.predictor import Predictor
from test_portable_save import pickle_globals

REPO = Path(__file__).resolve().parents[1]
SHAPE = [3, 64, 64]
NORM = {"NormalizeImage": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "order": ""}}
EVAL_OPS = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"resize_short": 72}}, {"CropImage": {"size": 64}}, NORM]
LABELS = ["cat", "dog", "bird"]


def randomize(model, seed=0):
    """He-normal weights, varied batch-norm statistics and a wide head, so outputs are decisive."""
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        for key, t in model.state_dict().items():
            shape = list(t.shape)
            if "int" in str(t.dtype) or not shape:
                continue
            if key.endswith("_variance"):
                value = 1.0 + 0.2 * rng.random(shape)
            elif len(shape) >= 2:  # Linear [in, out]; conv [out, in/groups, kh, kw]
                fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
                value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            elif key.endswith("weight"):  # norm scales
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                value = 0.1 * rng.standard_normal(shape)
            t.set_value(value.astype(str(t.dtype).replace("paddle.", "")))
        for key, t in model.state_dict().items():
            if model.is_classifier_key(key) and key.endswith("weight"):
                t.set_value(t.numpy() * 8.0)  # logits a few units apart
    model.eval()
    return model


def dygraph_probs(model, batch):
    model.eval()
    with paddle.no_grad():
        return paddle.nn.functional.softmax(model(paddle.to_tensor(batch)), axis=-1).numpy()


def real_images(shared):
    return sorted(str(p) for p in (shared / "images" / "imagenet").glob("*.jpeg"))


@pytest.fixture(scope="module")
def lcnet_export(tmp_path_factory):
    model = randomize(build_model({"name": "PPLCNet_x0_25", "class_num": 3}))
    out = export_dygraph(model, tmp_path_factory.mktemp("lcnet"), SHAPE, EVAL_OPS, LABELS,
                         model_name="PPLCNet_x0_25", topk=2)
    return model, out


@pytest.mark.parametrize("mkldnn", [True, False], ids=["onednn", "no-onednn"])
def test_predictor_matches_dygraph_on_real_images(shared, lcnet_export, mkldnn):
    model, out = lcnet_export
    images = real_images(shared)
    predictor = Predictor(out, enable_mkldnn=mkldnn, cpu_threads=1, batch_size=3)
    results = predictor.predict(images)
    # Reference: the dygraph model on the same images through the same build_transforms.
    transform = build_transforms(EVAL_OPS + [{"ToCHWImage": None}], "test")
    batch = np.stack([transform(Path(p).read_bytes()) for p in images]).astype(np.float32)
    ref = dygraph_probs(model, batch)
    assert ref.max(axis=1).min() > 0.4, "test model is not decisive enough to catch a mismatch"
    served = predictor.predict_arrays(batch)
    np.testing.assert_allclose(served, ref, atol=1e-4)
    for res, row, path in zip(results, ref, images):
        assert res["class_ids"][0] == int(row.argmax())
        assert res["scores"][0] == pytest.approx(float(row.max()), abs=1e-4)
        assert len(res["class_ids"]) == 2 and res["label_names"][0] == LABELS[res["class_ids"][0]]
        assert res["file_name"] == path


def test_inference_yml_describes_the_model(lcnet_export):
    _, out = lcnet_export
    info = yaml.safe_load((out / "inference.yml").read_text())
    glob = info["Global"]
    assert (glob["arch"], glob["class_num"], glob["image_shape"]) == ("PPLCNet_x0_25", 3, SHAPE)
    assert glob["model_name"] == "PP-LCNet_x0_25" and glob["schema_version"] == 2  # PaddleX's name
    assert glob["paddle_version"] == paddle.__version__ and glob["ppcls_ft_version"]
    assert (out / glob["model_file"]).is_file() and (out / glob["params_file"]).is_file()
    ops = info["PreProcess"]["transform_ops"]
    # The default DecodeImage is left out: PaddleX refuses one, and every reader applies it.
    assert [next(iter(op)) for op in ops] == ["ResizeImage", "CropImage", "NormalizeImage", "ToCHWImage"]
    assert info["PostProcess"]["Topk"] == {"topk": 2, "label_list": LABELS}


def test_paths_bytes_and_arrays_give_the_same_prediction(shared, lcnet_export):
    import cv2

    _, out = lcnet_export
    path = real_images(shared)[0]
    predictor = Predictor(out, cpu_threads=1)
    rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    by_path, by_bytes, by_array = predictor.predict([path, Path(path).read_bytes(), rgb])
    assert "file_name" not in by_bytes and "file_name" not in by_array
    for other in (by_bytes, by_array):
        assert other["class_ids"] == by_path["class_ids"]
        np.testing.assert_allclose(other["scores"], by_path["scores"], atol=1e-6)


@pytest.mark.parametrize("arch", [
    {"name": "ResNet18"}, {"name": "PPLCNet_x0_25"}, {"name": "MobileNetV2_x0_25"},
    {"name": "SwinTransformer_tiny_patch4_window7_224", "img_size": 64, "window_size": 2},
], ids=lambda a: a["name"])
def test_every_family_exports_and_serves(tmp_path, arch):
    model = randomize(build_model({**arch, "class_num": 3}), seed=1)
    out = export_dygraph(model, tmp_path, SHAPE, EVAL_OPS, None, model_name=arch["name"])
    batch = np.random.default_rng(2).standard_normal([2] + SHAPE).astype(np.float32)
    served = Predictor(out, cpu_threads=1).predict_arrays(batch)
    assert served.shape == (2, 3)
    np.testing.assert_allclose(served, dygraph_probs(model, batch), atol=1e-4)
    assert model.training is False  # export restores the mode it found


def assert_no_numpy_pickle(export_dir):
    """numpy 2 pickles do not load under PaddleClas's numpy 1.24; an export must hold none."""
    for path in Path(export_dir).glob("inference*"):
        data = path.read_bytes()
        if data[:1] == b"\x80":  # a pickle (protocol 2+): may only name builtins, no numpy global
            assert not [m for m, _ in pickle_globals(data) if m.startswith("numpy")], path
        else:
            assert b"numpy" not in data, path


def test_exported_files_hold_no_numpy_pickle(lcnet_export):
    assert_no_numpy_pickle(lcnet_export[1])


def test_legacy_pdmodel_export_is_served(tmp_path):
    """Paddle 3.3.1 still writes the Paddle 2 format when started with FLAGS_enable_pir_api=0."""
    script = (
        "import sys, numpy as np, paddle\n"
        f"sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from ppcls_ft import build_model\n"
        "from ppcls_ft.engine.export import export_dygraph\n"
        "from test_export import randomize, dygraph_probs, EVAL_OPS, SHAPE\n"
        "m = randomize(build_model({'name': 'ResNet18', 'class_num': 3}))\n"
        "x = np.random.default_rng(3).standard_normal([2] + SHAPE).astype('float32')\n"
        "export_dygraph(m, sys.argv[1], SHAPE, EVAL_OPS)\n"
        "np.save(sys.argv[1] + '/x.npy', x); np.save(sys.argv[1] + '/ref.npy', dygraph_probs(m, x))\n")
    env = {**os.environ, "FLAGS_enable_pir_api": "0"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "inference.pdmodel").is_file() and not (tmp_path / "inference.json").exists()
    assert (tmp_path / "inference.pdiparams.info").read_bytes()[:1] == b"\x80"  # jit.save's pickle
    assert_no_numpy_pickle(tmp_path)
    assert yaml.safe_load((tmp_path / "inference.yml").read_text())["Global"]["model_file"] == "inference.pdmodel"
    for mkldnn in (True, False):
        served = Predictor(tmp_path, enable_mkldnn=mkldnn, cpu_threads=1).predict_arrays(np.load(tmp_path / "x.npy"))
        np.testing.assert_allclose(served, np.load(tmp_path / "ref.npy"), atol=1e-4)
    (tmp_path / "inference.pdiparams").unlink()
    with pytest.raises(ConfigError, match="inference.pdmodel but no inference.pdiparams"):
        Predictor(tmp_path)


def test_model_dir_without_inference_yml_needs_preprocessing(tmp_path, lcnet_export):
    _, out = lcnet_export
    for name in ("inference.json", "inference.pdiparams"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    with pytest.raises(ConfigError, match="PreProcess.transform_ops"):
        Predictor(tmp_path)
    predictor = Predictor(tmp_path, preprocess_ops=EVAL_OPS, label_names=LABELS, topk=2, cpu_threads=1)
    image = np.full((80, 90, 3), 120, np.uint8)
    # the same engine on both sides (a PaddleClas export has no Engine record: oneDNN), so equal
    assert predictor.engine == "onednn"
    assert predictor.predict(image)[0] == Predictor(out, cpu_threads=1, engine="onednn").predict(image)[0]
    with pytest.raises(ConfigError, match="Global.inference_model_dir"):
        Predictor(tmp_path / "missing")


def _config(tmp_path, arch, pretrained=None, **glob):
    return {"Global": {"pretrained_model": pretrained, "image_shape": SHAPE,
                       "save_inference_dir": str(tmp_path / "inference"), **glob},
            "Arch": arch, "Infer": {"transforms": EVAL_OPS, "PostProcess": {"name": "Topk", "topk": 1}}}


def test_export_loads_weights_strictly(tmp_path):
    resnet = tmp_path / "resnet18.pdparams"
    paddle.save(build_model({"name": "ResNet18", "class_num": 3}).state_dict(), str(resnet))
    with pytest.raises(WeightsError, match="does not fit"):
        export_inference_model(_config(tmp_path, {"name": "PPLCNet_x0_25", "class_num": 3}, str(resnet)))
    with pytest.raises(WeightsError, match="Arch.class_num"):  # right family, wrong class count
        export_inference_model(_config(tmp_path, {"name": "ResNet18", "class_num": 5}, str(resnet)))
    with pytest.raises(ConfigError, match="Global.pretrained_model"):
        export_inference_model(_config(tmp_path, {"name": "ResNet18", "class_num": 3}))
    assert not (tmp_path / "inference").exists()
    out = export_inference_model(_config(tmp_path, {"name": "ResNet18", "class_num": 3}, str(resnet)))
    assert out == tmp_path / "inference" and (out / "inference.yml").is_file()


def test_onnx_export_names_the_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # import now fails, installed or not
    cfg = _config(tmp_path, {"name": "ResNet18", "class_num": 3}, export_onnx=True)
    with pytest.raises(ConfigError, match=r"Global.export_onnx.*pip install paddle2onnx onnxruntime"):
        export_inference_model(cfg, allow_random=True)
    assert not (tmp_path / "inference").exists()  # checked before the slow export


def test_label_names_come_from_the_dataset_label_list(tiny_dataset):
    _, train_list, _ = tiny_dataset
    cfg = {"DataLoader": {"Eval": {"dataset": {"cls_label_path": str(train_list)}}}}
    assert label_names_from_config(cfg, 3) == ["class0", "class1", "class2"]
    with pytest.raises(ConfigError, match="DataLoader.Eval.dataset.cls_label_path.*class_num=4"):
        label_names_from_config(cfg, 4)
    assert label_names_from_config({"DataLoader": {}}, 3) is None


@pytest.fixture(scope="module")
def mobilenet_export(shared, tmp_path_factory):
    """The real ImageNet MobileNetV2 exported through tools/export_model.py and the PaddleClas config."""
    out = tmp_path_factory.mktemp("mbv2") / "inference"
    cmd = [sys.executable, str(REPO / "tools" / "export_model.py"),
           "-c", str(shared / "paddleclas_configs" / "MobileNetV2.yaml"),
           "-o", f"Global.pretrained_model={shared / 'weights' / 'MobileNetV2_imagenet'}",
           "-o", f"Global.save_inference_dir={out}",
           "-o", f"Infer.PostProcess.class_id_map_file={shared / 'images' / 'imagenet1k_label_list.txt'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_exported_mobilenetv2_reproduces_expected_top5(shared, mobilenet_export):
    expected = json.loads((shared / "images" / "imagenet" / "expected_top5_MobileNetV2_imagenet.json").read_text())
    results = Predictor(mobilenet_export, batch_size=4).predict(real_images(shared))
    assert len(results) == len(expected) == 4
    for res in results:
        want = expected[Path(res["file_name"]).name]
        assert res["class_ids"][0] == want[0][0] and res["label_names"][0] == want[0][1]
        # Another resize/decoder moves probabilities slightly (images/README.md).
        assert res["scores"][0] == pytest.approx(want[0][2], abs=0.02)
        assert res["class_ids"][:3] == [c for c, _, _ in want[:3]]


def test_deploy_script_runs_from_another_directory(shared, mobilenet_export, tmp_path):
    save = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(REPO / "deploy" / "python" / "predict_cls.py"),
           "-c", str(REPO / "deploy" / "configs" / "inference_cls.yaml"),
           "-o", f"Global.inference_model_dir={mobilenet_export}",
           "-o", f"Global.infer_imgs={shared / 'images' / 'imagenet'}",
           "-o", f"Global.save_path={save}", "-o", "PostProcess.topk=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ILSVRC2012_val_00000010.jpeg:\tclass id(s): [332, " in proc.stdout
    assert "label_name(s): ['Angora, Angora rabbit'" in proc.stdout
    saved = json.loads(save.read_text())
    assert len(saved) == 4 and all(len(r["class_ids"]) == 2 for r in saved)
    assert {Path(r["file_name"]).name for r in saved} == {Path(p).name for p in real_images(shared)}


def test_deploy_config_rejects_typos_and_reads_overrides(tmp_path):
    from ppcls_ft.data.dataset import list_images
    from ppcls_ft.predictor import load_deploy_config

    path = REPO / "deploy" / "configs" / "inference_cls.yaml"
    cfg = load_deploy_config(path, ["Global.inference_model_dir=/models/x", "Global.batch_size=4"])
    assert cfg["Global"]["inference_model_dir"] == "/models/x" and cfg["Global"]["batch_size"] == 4
    with pytest.raises(ConfigError, match=r"Global.enable_mkldn.*did you mean 'enable_mkldnn'"):
        load_deploy_config(path, ["Global.enable_mkldn=False"])
    with pytest.raises(ConfigError, match="Global.batch_size: expected int"):
        load_deploy_config(path, ["Global.batch_size=four"])
    with pytest.raises(ConfigError, match="Global.infer_imgs"):
        list_images(str(tmp_path))  # an empty directory


def test_folder_dataset_class_names_become_label_names(tmp_path):
    from ppcls_ft.engine.export import label_names_from_config
    for name in ("tulip", "daisy", "rose"):
        (tmp_path / "photos" / name).mkdir(parents=True)
    cfg = {"DataLoader": {"Eval": {"dataset": {"name": "ImageFolderDataset",
                                               "image_root": str(tmp_path / "photos")}}}}
    assert label_names_from_config(cfg, 3) == ["daisy", "rose", "tulip"]


def test_onnx_export_matches_paddle_inference(tmp_path):
    """Global.export_onnx: True requires the ONNX file; the certificate checks ONNX Runtime on the
    same inputs as paddle-inference (tests/test_runtimes.py covers the engine choice)."""
    pytest.importorskip("paddle2onnx", reason="the [cpu] extra installs it: pip install -e .[cpu]")
    pytest.importorskip("onnxruntime", reason="the [cpu] extra installs it: pip install -e .[cpu]")
    from ppcls_ft.engine.export import export_dygraph
    from ppcls_ft.models import build_model
    model = build_model({"name": "ResNet18", "class_num": 3})
    ops = [{"DecodeImage": {"to_rgb": True}}, {"ResizeImage": {"resize_short": 64}},
           {"CropImage": {"size": 64}},
           {"NormalizeImage": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "order": ""}},
           {"ToCHWImage": None}]
    out = export_dygraph(model, tmp_path / "m", [3, 64, 64], ops, ["a", "b", "c"], model_name="ResNet18",
                         export_onnx=True, choose_engine=False)
    cert = json.loads((out / "export_certificate.json").read_text())
    assert cert["engines"]["onnxruntime"]["max_abs_prob_diff"] < 1e-4
    assert (out / "inference.onnx").stat().st_size > 1000
    assert "fastest" not in yaml.safe_load((out / "inference.yml").read_text())["Engine"]


def test_openvino_engine_serves_the_same_probabilities(lcnet_export):
    model, out = lcnet_export
    batch = np.random.default_rng(5).standard_normal([2] + SHAPE).astype(np.float32)
    served = Predictor(out, engine="openvino", cpu_threads=1).run_graph(batch)
    np.testing.assert_allclose(served, dygraph_probs(model, batch), atol=1e-4)
    with pytest.raises(ConfigError, match="engine: must be one of auto, onednn, native, openvino"):
        Predictor(out, engine="tensorrt")
