"""The user-facing commands, run as a user would: tools/train.py, eval.py, infer.py; clean errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import TINY

REPO = Path(__file__).resolve().parents[1]


def run_tool(name, *args, cwd=None):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def cfg_path(tmp_path, tiny_dataset):
    root, lst, labels = tiny_dataset
    path = tmp_path / "tiny.yaml"
    text = TINY.format(out=tmp_path / "out", root=root, lst=lst, epochs=1, vdl=False)
    text = text.replace("warmup_epoch: 1", "warmup_epoch: 0")
    text += (f"Infer:\n  infer_imgs: {root / 'images'}\n  batch_size: 5\n  transforms:\n"
             "    - DecodeImage: {to_rgb: True}\n    - ResizeImage: {resize_short: 32}\n"
             "    - CropImage: {size: 32}\n"
             "    - NormalizeImage: {scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], order: ''}\n"
             "    - ToCHWImage:\n"
             f"  PostProcess: {{name: Topk, topk: 2, class_id_map_file: {labels}}}\n")
    path.write_text(text)
    return path


def test_train_eval_infer_from_the_command_line(cfg_path, tmp_path):
    code, out = run_tool("train.py", "-c", str(cfg_path), "-o", "Global.epochs=2", cwd=tmp_path)
    assert code == 0, out
    assert "[Train][Epoch 2/2]" in out and "Diagnosis:" in out and "train_results.json" in out
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    best = results["best_top1"]

    code, out = run_tool("eval.py", "-c", str(cfg_path), "-o",
                         f"Global.pretrained_model={tmp_path / 'out' / 'best_model'}")
    assert code == 0, out
    assert f"top1: {best:.5f}" in out  # re-evaluating best_model reproduces the recorded metric

    code, out = run_tool("infer.py", "-c", str(cfg_path), "-o",
                         f"Global.pretrained_model={tmp_path / 'out' / 'best_model.pdparams'}")
    assert code == 0, out
    lines = [line for line in out.splitlines() if "class id(s):" in line]
    assert len(lines) == 12 and all("label_name(s): ['class" in line for line in lines)


@pytest.mark.parametrize("override, message", [
    ("Global.epoch=3", "Global.epoch: unknown key (did you mean 'epochs'?)"),
    ("Arch.name=ResNet5O", "unknown model 'ResNet5O' (did you mean 'ResNet50'?)"),
])
def test_bad_config_exits_with_one_clear_line(cfg_path, override, message):
    code, out = run_tool("train.py", "-c", str(cfg_path), "-o", override)
    assert code == 2
    assert message in out and "Traceback" not in out


def test_bad_list_line_names_file_and_line(cfg_path, tiny_dataset):
    _, lst, _ = tiny_dataset
    lines = lst.read_text().splitlines()
    lines[4] = "images/c1/missing.jpg 1"
    lst.write_text("\n".join(lines) + "\n")
    code, out = run_tool("train.py", "-c", str(cfg_path))
    assert code == 2 and "train_list.txt:5" in out and "Traceback" not in out


def test_eval_requires_weights(cfg_path):
    code, out = run_tool("eval.py", "-c", str(cfg_path))
    assert code == 2 and "Global.pretrained_model" in out


def test_demo_dataset_is_deterministic_and_balanced(tmp_path):
    from ppcls_ft.demo import CLASSES, make_demo_dataset
    a = make_demo_dataset(tmp_path / "a", train_per_class=3, val_per_class=2, size=32)
    b = make_demo_dataset(tmp_path / "b", train_per_class=3, val_per_class=2, size=32)
    lines = (a / "train_list.txt").read_text().split("\n")
    assert len([x for x in lines if x]) == 3 * len(CLASSES)
    assert (a / "images/train/rings/0001.jpg").read_bytes() == (b / "images/train/rings/0001.jpg").read_bytes()
    assert (a / "label_list.txt").read_text().splitlines()[0] == "0 horizontal_stripes"


def test_eval_refuses_weights_of_another_class_count(cfg_path, tmp_path):
    code, out = run_tool("train.py", "-c", str(cfg_path))
    assert code == 0, out
    code, out = run_tool("eval.py", "-c", str(cfg_path), "-o", "Arch.class_num=4", "-o",
                         f"Global.pretrained_model={tmp_path / 'out' / 'latest'}")
    assert code == 2 and "does not fit Arch.class_num=4" in out


def run_tool_streams(script, *args):
    """Run ``script`` (a path below the repository) and return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_error_line(code, out, err, *needles):
    """Exit 2, no traceback, and stderr is exactly one ``error:`` line holding every needle."""
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def blocker(tmp_path):
    """A regular file where a tool would have to create a folder."""
    path = tmp_path / "blocker"
    path.write_text("not a folder\n")
    return path


def test_export_with_a_missing_weights_file(cfg_path, tmp_path):
    missing = tmp_path / "runs" / "best_model"
    code, out, err = run_tool_streams("tools/export_model.py", "-c", str(cfg_path),
                                      "-o", f"Global.pretrained_model={missing}")
    assert_one_error_line(code, out, err, f"{missing}.pdparams", "Global.pretrained_model")


def test_export_without_weights_says_which_key_or_flag(cfg_path):
    code, out, err = run_tool_streams("tools/export_model.py", "-c", str(cfg_path))
    assert_one_error_line(code, out, err, "Global.pretrained_model", "--allow-random")


def test_export_below_a_regular_file_names_key_and_file(cfg_path, blocker):
    target = blocker / "inference"
    code, out, err = run_tool_streams("tools/export_model.py", "-c", str(cfg_path), "--allow-random",
                                      "-o", f"Global.save_inference_dir={target}")
    assert_one_error_line(code, out, err, "Global.save_inference_dir", str(target),
                          f"{blocker} is a regular file")


def test_train_output_dir_below_a_regular_file_names_key_and_file(cfg_path, blocker):
    target = blocker / "out"
    code, out, err = run_tool_streams("tools/train.py", "-c", str(cfg_path),
                                      "-o", f"Global.output_dir={target}")
    assert_one_error_line(code, out, err, "Global.output_dir", str(target), f"{blocker} is a regular file")


def test_deploy_with_a_missing_model_dir(tmp_path):
    missing = tmp_path / "inference"
    code, out, err = run_tool_streams("deploy/python/predict_cls.py", "-c",
                                      str(REPO / "deploy" / "configs" / "inference_cls.yaml"),
                                      "-o", f"Global.inference_model_dir={missing}")
    assert_one_error_line(code, out, err, "Global.inference_model_dir", str(missing))


def test_an_os_error_points_at_the_closest_configured_path(tmp_path):
    from ppcls_ft.engine.cli import user_message

    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out" / "run"
    cfg = {"Global": {"output_dir": str(out), "save_inference_dir": str(out / "inference")},
           "Infer": {"infer_imgs": str(tmp_path)}}
    # os.makedirs fails at the first missing parent, /file/out: output_dir is the closest key.
    message = user_message(NotADirectoryError(20, "Not a directory", str(tmp_path / "file" / "out")), cfg)
    assert message.startswith("Global.output_dir: ") and f"{tmp_path / 'file'} is a regular file" in message
    message = user_message(PermissionError(13, "Permission denied", str(out / "inference" / "x.yml")), cfg)
    assert message.startswith("Global.save_inference_dir: permission denied")
    assert user_message(FileNotFoundError(2, "No such file", "/elsewhere/a.txt"), cfg) == (
        "file or folder not found: /elsewhere/a.txt; check the path")
