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
