"""The training loop end to end on a tiny dataset: logs, results, checkpoints, exact resume,
gradient accumulation, divergence handling, strategies."""
import json
import math

import numpy as np
import pytest

from ppcls_ft.config import load_config
from ppcls_ft.engine.checkpoint import load_checkpoint
from ppcls_ft.engine.run import train

TINY = """
Global:
  output_dir: {out}
  device: cpu
  seed: 3
  epochs: {epochs}
  save_interval: 1
  print_batch_step: 1
  use_visualdl: {vdl}
  image_shape: [3, 32, 32]
Arch:
  name: PPLCNet_x0_25
  class_num: 3
Loss:
  Train: [{{CELoss: {{weight: 1.0, epsilon: 0.1}}}}]
  Eval: [{{CELoss: {{weight: 1.0}}}}]
Optimizer:
  name: Momentum
  momentum: 0.9
  lr: {{name: Cosine, learning_rate: 0.05, warmup_epoch: 1}}
  regularizer: {{name: L2, coeff: 0.0001}}
DataLoader:
  Train:
    dataset:
      name: ImageNetDataset
      image_root: {root}
      cls_label_path: {lst}
      transform_ops:
        - DecodeImage: {{to_rgb: True}}
        - RandCropImage: {{size: 32}}
        - RandFlipImage: {{flip_code: 1}}
        - NormalizeImage: {{scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], order: ""}}
    sampler: {{name: DistributedBatchSampler, batch_size: 4, shuffle: True, drop_last: False}}
    loader: {{num_workers: 0}}
  Eval:
    dataset:
      name: ImageNetDataset
      image_root: {root}
      cls_label_path: {lst}
      transform_ops:
        - DecodeImage: {{to_rgb: True}}
        - ResizeImage: {{resize_short: 32}}
        - CropImage: {{size: 32}}
        - NormalizeImage: {{scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], order: ""}}
    sampler: {{name: DistributedBatchSampler, batch_size: 8, shuffle: False}}
    loader: {{num_workers: 0}}
Metric:
  Train: [{{TopkAcc: {{topk: [1, 2]}}}}]
  Eval: [{{TopkAcc: {{topk: [1, 2]}}}}]
"""


def make_cfg(tmp_path, tiny_dataset, name="run", epochs=2, vdl=False, overrides=()):
    root, lst, _ = tiny_dataset
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(out=tmp_path / name, root=root, lst=lst, epochs=epochs,
                                vdl=vdl))
    return load_config(path, list(overrides))


def test_train_writes_logs_results_and_checkpoints(tmp_path, tiny_dataset, capsys):
    cfg = make_cfg(tmp_path, tiny_dataset, epochs=2, vdl=True)
    result = train(cfg)
    out = tmp_path / "run"
    for name in ("latest", "best_model", "epoch_1", "epoch_2"):
        for suffix in (".pdparams", ".pdopt", ".pdstates"):
            assert (out / f"{name}{suffix}").is_file(), name + suffix
    assert not list(out.glob("*.tmp*")), "temporary checkpoint files left behind"
    data = json.loads((out / "train_results.json").read_text())
    assert [r["epoch"] for r in data["epochs"]] == [1, 2]
    for rec in data["epochs"]:
        assert math.isfinite(rec["train_loss"]) and 0 <= rec["eval_top1"] <= 1
        assert rec["images_per_sec"] > 0 and rec["lr"] >= 0 and rec["skipped_images"] == 0
    assert data["best_epoch"] in (1, 2) and data["diagnosis"]["verdict"]
    log = (out / "train.log").read_text()
    assert "[Train][Epoch 1/2][Iter: 1/3]lr:" in log and "batch_cost:" in log and "eta:" in log
    assert "[Eval][Epoch 2][Avg]" in log and "top1:" in log
    assert (out / "config.yaml").is_file()
    from visualdl import LogReader
    reader = LogReader(file_path=str(next((out / "vdl").glob("vdlrecords.*"))))
    tags = set(reader.get_tags()["scalar"])
    assert {"train_lr", "train_loss", "train_CELoss", "train_top1", "train_ips",
            "eval_loss", "eval_CELoss", "eval_top1", "eval_top2"} <= tags
    assert [r.id for r in reader.get_data("scalar", "eval_top1")] == [1, 2]
    assert result["best_top1"] == data["best_top1"]


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_dataset):
    full = make_cfg(tmp_path, tiny_dataset, name="full", epochs=4)
    train(full)
    first = make_cfg(tmp_path, tiny_dataset, name="part", epochs=4,
                     overrides=["Global.epochs=4"])
    # Interrupt after epoch 2: train a 4-epoch schedule but stop by resuming from epoch_2 of a run
    # whose loop we cut short by hand (same schedule length, so the LR curve is identical).
    import paddle
    from ppcls_ft.engine.builder import build_train_parts
    from ppcls_ft.engine.trainer import Trainer
    with paddle.utils.unique_name.guard():  # as engine.run.train does: names as in a fresh process
        trainer = Trainer(build_train_parts(first))
        for epoch in (1, 2):
            record = trainer.train_epoch(epoch)
            record.update(trainer.maybe_evaluate(epoch))
            trainer.history.append(record)
            trainer.epoch = epoch
            trainer.save_epoch(epoch, record)
    resumed = make_cfg(tmp_path, tiny_dataset, name="part", epochs=4,
                       overrides=[f"Global.checkpoints={tmp_path / 'part' / 'epoch_2'}"])
    train(resumed)
    a = load_checkpoint(tmp_path / "full" / "latest")
    b = load_checkpoint(tmp_path / "part" / "latest")
    assert a["states"]["epoch"] == b["states"]["epoch"] == 4
    assert a["states"]["global_step"] == b["states"]["global_step"]
    for key, value in a["params"].items():
        np.testing.assert_allclose(b["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert b["states"]["history"][0]["train_loss"] == pytest.approx(a["states"]["history"][0]["train_loss"])
    assert b["states"]["best_top1"] == pytest.approx(a["states"]["best_top1"])


def test_gradient_accumulation_steps_lr_per_optimizer_step(tmp_path, tiny_dataset):
    # 12 images, batch 4 -> 3 iterations; update_freq 2 -> 1 optimizer step per epoch.
    cfg = make_cfg(tmp_path, tiny_dataset, name="acc", epochs=2, overrides=["Global.update_freq=2"])
    train(cfg)
    states = load_checkpoint(tmp_path / "acc" / "latest")["states"]
    assert states["global_step"] == 2


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_dataset):
    cfg = make_cfg(tmp_path, tiny_dataset, name="nan", epochs=3,
                   overrides=["Optimizer.lr.learning_rate=1e12", "Optimizer.lr.warmup_epoch=0"])
    result = train(cfg)
    assert result["diverged_at"] and "loss is" in result["diverged_at"]
    data = json.loads((tmp_path / "nan" / "train_results.json").read_text())
    assert data["diagnosis"]["verdict"] == "diverged"
    assert any("learning_rate" in a for a in data["diagnosis"]["advice"])
    saved = len(data["epochs"])
    assert saved < 3
    if saved:  # the last good epoch is on disk, nothing after it
        st = load_checkpoint(tmp_path / "nan" / "latest")["states"]
        assert st["epoch"] == saved
        assert all(np.isfinite(v).all() for v in load_checkpoint(tmp_path / "nan" / "latest")["params"].values())


def test_linear_probe_trains_only_the_head(tmp_path, tiny_dataset):
    from ppcls_ft.engine.builder import build_train_parts
    from ppcls_ft.engine.trainer import Trainer
    cfg = make_cfg(tmp_path, tiny_dataset, name="probe", epochs=1, overrides=["FineTune.linear_probe=True", "Optimizer.lr.warmup_epoch=0"])
    parts = build_train_parts(cfg)
    before = {k: v.numpy().copy() for k, v in parts.model.state_dict().items()}
    Trainer(parts).fit()
    after = parts.model.state_dict()
    changed = {k for k in before if not np.array_equal(before[k], after[k].numpy())}
    assert changed and all(k.startswith("fc.") for k in changed), sorted(changed)[:5]


def test_freeze_then_unfreeze(tmp_path, tiny_dataset):
    from ppcls_ft.engine.builder import build_train_parts
    from ppcls_ft.engine.trainer import Trainer
    cfg = make_cfg(tmp_path, tiny_dataset, name="fz", epochs=2,
                   overrides=["FineTune.freeze_backbone_epochs=1", "FineTune.unfreeze_lr_factor=0.5"])
    parts = build_train_parts(cfg)
    trainer = Trainer(parts)

    def snap():
        return {k: v.numpy().copy() for k, v in parts.model.state_dict().items()}

    s0 = snap()
    trainer.train_epoch(1)
    s1 = snap()
    assert all(np.array_equal(s0[k], s1[k]) for k in s0 if not k.startswith("fc."))
    assert not np.array_equal(s0["fc.weight"], s1["fc.weight"])
    trainer.train_epoch(2)
    s2 = snap()
    assert not np.array_equal(s1["conv1.conv.weight"], s2["conv1.conv.weight"])
    lr_attr = dict(parts.model.named_parameters())["conv1.conv.weight"].optimize_attr["learning_rate"]
    assert lr_attr == pytest.approx(0.5)


def test_freeze_longer_than_training_is_an_error(tmp_path, tiny_dataset):
    from ppcls_ft.engine.builder import build_train_parts
    from ppcls_ft.errors import ConfigError
    cfg = make_cfg(tmp_path, tiny_dataset, name="bad", epochs=2, overrides=["FineTune.freeze_backbone_epochs=2"])
    with pytest.raises(ConfigError, match="FineTune.freeze_backbone_epochs"):
        build_train_parts(cfg)


def test_amp_is_refused_on_cpu_with_a_message(tmp_path, tiny_dataset, capsys):
    from ppcls_ft.engine.builder import build_train_parts
    cfg = make_cfg(tmp_path, tiny_dataset, name="amp", epochs=1,
                   overrides=["AMP={use_amp: True, level: O1}", "Optimizer.lr.warmup_epoch=0"])
    parts = build_train_parts(cfg)
    assert parts.scaler is None and parts.amp_level is None
    assert "mixed precision needs a GPU" in capsys.readouterr().out


def test_class_weight_auto_uses_inverse_frequency(tmp_path, tiny_dataset):
    from ppcls_ft.engine.builder import build_train_parts
    root, lst, _ = tiny_dataset
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join(lines[:4] + lines[4:6] + lines[8:]) + "\n")  # 4, 2, 4 images per class
    cfg = make_cfg(tmp_path, tiny_dataset, name="cw", epochs=1,
                   overrides=["Loss.Train.0.CELoss.class_weight=auto", "Optimizer.lr.warmup_epoch=0"])
    parts = build_train_parts(cfg)
    ce = parts.train_loss
    weights = None
    for layer in ce.sublayers(include_self=True):
        if getattr(layer, "class_weight", None) is not None:
            weights = np.asarray(layer.class_weight.numpy() if hasattr(layer.class_weight, "numpy")
                                 else layer.class_weight, dtype="float64").ravel()
    assert weights is not None
    np.testing.assert_allclose(weights, [10 / 12, 10 / 6, 10 / 12], rtol=1e-5)


def test_ema_is_evaluated_saved_and_resumed(tmp_path, tiny_dataset):
    cfg = make_cfg(tmp_path, tiny_dataset, name="ema", epochs=2, overrides=["EMA={decay: 0.9}"])
    result = train(cfg)
    rec = result["history"][-1]
    assert 0 <= rec["eval_ema_top1"] <= 1 and "eval_top1" in rec
    parts = load_checkpoint(tmp_path / "ema" / "latest")
    assert parts["ema"] is not None
    # EMA weights differ from the raw weights, and .pdparams keeps the raw model (not the EMA).
    key = "fc.weight"
    assert not np.allclose(parts["ema"][key], parts["params"][key])


def test_corrupt_image_is_skipped_and_counted(tmp_path, tiny_dataset):
    root, lst, _ = tiny_dataset
    first = lst.read_text().split()[0]
    (root / first).write_bytes(b"not a jpeg at all")
    cfg = make_cfg(tmp_path, tiny_dataset, name="bad", epochs=1, overrides=["Optimizer.lr.warmup_epoch=0"])
    result = train(cfg)
    assert result["history"][0]["skipped_images"] == 1
    log = (tmp_path / "bad" / "train.log").read_text()
    assert "1 unreadable images were skipped" in log and "skipped: 1 images" in log
