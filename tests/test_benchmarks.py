"""The benchmark scripts still run (tiny settings); their numbers are produced by hand, not here."""
import importlib.util
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_flowers_smoke(tmp_path, tiny_dataset):
    root, lst, _ = tiny_dataset
    for name in ("train_list_mini.txt", "val_list_mini.txt"):
        shutil.copy(lst, root / name)
    bench = load_script("finetune_flowers")
    out = tmp_path / "docs"
    results = bench.main(["--data", str(root), "--weights", "unused", "--split", "mini", "--size", "32",
                          "--epochs", "1", "--batch-size", "4", "--workers", "0", "--runs", "scratch",
                          "--out", str(out), "--work", str(tmp_path / "work"),
                          "-o", "Arch.class_num=3", "-o", "Optimizer.lr.warmup_epoch=0"])
    assert 0 <= results["scratch"]["best_top1"] <= 1
    saved = json.loads((out / "flowers5_mini_32px.json").read_text())
    assert list(saved["results"]) == ["scratch"]
    assert "| scratch |" in (out / "flowers5_mini_32px.md").read_text()
    assert (out / "flowers5_mini_32px.png").stat().st_size > 1000
