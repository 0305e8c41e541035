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


RESUME_EXTRAS = {
    "plain": [],
    # everything a resume must restore or re-derive, at once: EMA, Mixup/Cutmix sampling,
    # the freeze boundary (unfreezes in epoch 3, after the resume point), accumulation, workers
    "everything": ["EMA={decay: 0.9}", "FineTune.freeze_backbone_epochs=2",
                   "FineTune.unfreeze_lr_factor=0.5", "Global.update_freq=2",
                   "DataLoader.Train.loader.num_workers=2",
                   "DataLoader.Train.dataset.batch_transform_ops=[{OpSampler: {MixupOperator: "
                   "{alpha: 0.8, prob: 0.5}, CutmixOperator: {alpha: 1.0, prob: 0.5}}}]"],
}


@pytest.mark.parametrize("extras", list(RESUME_EXTRAS), ids=str)
def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_dataset, extras):
    """4 epochs in one go == 2 epochs, then a fresh process-like run resumed from epoch_2."""
    extra = RESUME_EXTRAS[extras]
    train(make_cfg(tmp_path, tiny_dataset, name="full", epochs=4, overrides=extra))
    resumed = make_cfg(tmp_path, tiny_dataset, name="part", epochs=4, overrides=extra + [
        f"Global.checkpoints={tmp_path / 'full' / 'epoch_2'}"])
    train(resumed)
    a = load_checkpoint(tmp_path / "full" / "latest")
    b = load_checkpoint(tmp_path / "part" / "latest")
    sa, sb = a["states"]["train_state"], b["states"]["train_state"]
    assert sa["epoch"] == sb["epoch"] == 4
    assert sa["global_step"] == sb["global_step"] > 0
    for key, value in a["params"].items():
        np.testing.assert_allclose(b["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    if extras == "everything":
        for key, value in a["ema"].items():
            np.testing.assert_allclose(b["ema"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    la = [r["train_loss"] for r in sa["history"]]
    lb = [r["train_loss"] for r in sb["history"]]
    np.testing.assert_allclose(lb, la, rtol=1e-5)  # epochs 1-2 from the file, 3-4 re-run
    assert sb["best_top1"] == pytest.approx(sa["best_top1"])


def test_resume_refuses_another_model_or_class_count(tmp_path, tiny_dataset):
    from ppcls_ft.errors import WeightsError
    train(make_cfg(tmp_path, tiny_dataset, name="a", epochs=1, overrides=["Optimizer.lr.warmup_epoch=0"]))
    ck = tmp_path / "a" / "latest"
    with pytest.raises(WeightsError, match=r"Arch.class_num=3 but this config has Arch.class_num=4"):
        train(make_cfg(tmp_path, tiny_dataset, name="b", epochs=2,
                       overrides=[f"Global.checkpoints={ck}", "Arch.class_num=4"]))
    with pytest.raises(WeightsError, match=r"Arch.name='PPLCNet_x0_25'"):
        train(make_cfg(tmp_path, tiny_dataset, name="c", epochs=2,
                       overrides=[f"Global.checkpoints={ck}", "Arch.name=PPLCNet_x0_35"]))


def test_resume_is_strict_about_train_state_keys(tmp_path, tiny_dataset):
    import paddle
    from ppcls_ft.errors import WeightsError
    train(make_cfg(tmp_path, tiny_dataset, name="a", epochs=1, overrides=["Optimizer.lr.warmup_epoch=0"]))
    ck = tmp_path / "a" / "latest"
    states = load_checkpoint(ck)["states"]
    del states["train_state"]["history"]
    paddle.save(states, str(ck) + ".pdstates")
    with pytest.raises(WeightsError, match=r"missing \['history'\]"):
        train(make_cfg(tmp_path, tiny_dataset, name="b", epochs=2,
                       overrides=[f"Global.checkpoints={ck}"]))


def test_auto_resume_continues_from_latest(tmp_path, tiny_dataset):
    train(make_cfg(tmp_path, tiny_dataset, name="auto", epochs=1,
                   overrides=["Global.auto_resume=True", "Optimizer.lr.warmup_epoch=0"]))
    result = train(make_cfg(tmp_path, tiny_dataset, name="auto", epochs=2,
                            overrides=["Global.auto_resume=True", "Optimizer.lr.warmup_epoch=0"]))
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    log = (tmp_path / "auto" / "train.log").read_text()
    assert "no " in log and "starting from epoch 1" in log
    assert f"resumed from {tmp_path / 'auto' / 'latest'}" in log


def test_save_interval_zero_writes_no_epoch_files(tmp_path, tiny_dataset):
    train(make_cfg(tmp_path, tiny_dataset, name="si", epochs=2, overrides=["Global.save_interval=0"]))
    out = tmp_path / "si"
    assert (out / "latest.pdparams").is_file() and not list(out.glob("epoch_*"))


def test_gradient_accumulation_steps_lr_per_optimizer_step(tmp_path, tiny_dataset):
    # 12 images, batch 4 -> 3 iterations; update_freq 2 -> 1 optimizer step per epoch.
    cfg = make_cfg(tmp_path, tiny_dataset, name="acc", epochs=2, overrides=["Global.update_freq=2"])
    train(cfg)
    states = load_checkpoint(tmp_path / "acc" / "latest")["states"]
    assert states["train_state"]["global_step"] == 2


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
    latest = tmp_path / "nan" / "latest.pdstates"
    assert latest.is_file() == (saved > 0)
    if saved:  # the last good epoch is on disk, nothing after it (else nothing at all)
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


def _paddleclas_copy(src, dst, opt_state=None):
    """``src`` (ours) rewritten the way PaddleClas's save_model writes a checkpoint: .pdparams,
    .pdopt as a list of optimizer state dicts, .pdstates as {metric, epoch}; paddle.save."""
    import paddle
    from ppcls_ft.utils.safe_pickle import load_pdparams, safe_load, unwrap_tensors
    dst.parent.mkdir(parents=True, exist_ok=True)
    paddle.save(load_pdparams(f"{src}.pdparams"), f"{dst}.pdparams")
    opt = opt_state if opt_state is not None else unwrap_tensors(safe_load(f"{src}.pdopt"))
    paddle.save([opt], f"{dst}.pdopt")
    paddle.save({"metric": 0.25, "epoch": 1}, f"{dst}.pdstates")


def test_resume_from_a_paddleclas_checkpoint(tmp_path, tiny_dataset):
    train(make_cfg(tmp_path, tiny_dataset, name="src", epochs=2))
    pc = tmp_path / "pc" / "epoch_1"
    _paddleclas_copy(tmp_path / "src" / "epoch_1", pc)
    result = train(make_cfg(tmp_path, tiny_dataset, name="resumed", epochs=2,
                            overrides=[f"Global.checkpoints={pc}"]))
    assert [r["epoch"] for r in result["history"]] == [2]  # PaddleClas keeps no history
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert f"resumed from {pc} (PaddleClas): epoch 1, step 3, best top1 0.25000" in log
    assert "metric 0.25000 taken as the best top-1" in log and "random draws restart" in log
    # the seed tree is a function of (Global.seed, rank, epoch): epoch 2 replays exactly
    a = load_checkpoint(tmp_path / "src" / "latest")["params"]
    b = load_checkpoint(tmp_path / "resumed" / "latest")["params"]
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_optimizer_state_that_does_not_fit_is_an_error_or_said(tmp_path, tiny_dataset):
    import paddle
    from ppcls_ft.errors import WeightsError
    from ppcls_ft.utils.safe_pickle import safe_load, unwrap_tensors
    train(make_cfg(tmp_path, tiny_dataset, name="src", epochs=2))
    src = tmp_path / "src" / "epoch_1"
    opt = unwrap_tensors(safe_load(f"{src}.pdopt"))
    key = next(k for k in opt if k.endswith("_velocity_0"))
    opt["renamed_velocity_0"] = opt.pop(key)
    paddle.save(opt, f"{src}.pdopt")  # ours, damaged: strict
    states = unwrap_tensors(safe_load(f"{src}.pdstates"))
    states.pop("files")  # as if written without the files record, so the .pdopt itself is read
    paddle.save(states, f"{src}.pdstates")
    with pytest.raises(WeightsError, match=rf"missing \['{key}'\].*unexpected \['renamed_velocity_0'\]"):
        train(make_cfg(tmp_path, tiny_dataset, name="bad", epochs=2,
                       overrides=[f"Global.checkpoints={src}"]))
    pc = tmp_path / "pc" / "epoch_1"  # PaddleClas's, with names of another process: said
    _paddleclas_copy(src, pc, opt_state=opt)
    train(make_cfg(tmp_path, tiny_dataset, name="pcres", epochs=2,
                   overrides=[f"Global.checkpoints={pc}"]))
    log = (tmp_path / "pcres" / "train.log").read_text()
    assert "optimizer state not restored (names differ" in log and "the LR schedule was" in log


def test_resume_without_pdema_restarts_ema_from_the_resumed_weights(tmp_path, tiny_dataset):
    from ppcls_ft.engine.builder import build_train_parts
    from ppcls_ft.engine.resume import restore
    from ppcls_ft.engine.trainer import Trainer
    import paddle
    train(make_cfg(tmp_path, tiny_dataset, name="plain", epochs=2))  # no EMA section: no .pdema
    cfg = make_cfg(tmp_path, tiny_dataset, name="ema", epochs=3, overrides=["EMA={decay: 0.99}"])
    with paddle.utils.unique_name.guard():
        parts = build_train_parts(cfg)
        trainer = Trainer(parts)
        restore(parts, trainer.inner, trainer.state, str(tmp_path / "plain" / "epoch_2"), parts.logger)
    resumed = load_checkpoint(tmp_path / "plain" / "epoch_2")["params"]
    for key, value in resumed.items():
        np.testing.assert_allclose(parts.ema.shadow[key].numpy(), value, rtol=1e-6, err_msg=key)


def test_resume_with_another_seed_is_refused(tmp_path, tiny_dataset):
    from ppcls_ft.errors import ConfigError
    train(make_cfg(tmp_path, tiny_dataset, name="a", epochs=1, overrides=["Optimizer.lr.warmup_epoch=0"]))
    with pytest.raises(ConfigError, match=r"Global.seed: is 4 but .* trained with seed 3; resume with Global.seed=3"):
        train(make_cfg(tmp_path, tiny_dataset, name="b", epochs=2, overrides=[
            f"Global.checkpoints={tmp_path / 'a' / 'latest'}", "Global.seed=4"]))


def test_resume_with_another_batch_size_repositions_the_schedule(tmp_path, tiny_dataset):
    # 12 images: batch 4 -> 3 steps per epoch; batch 6 -> 2. Resumed after epoch 1 at batch 6,
    # the schedule continues from step 1 x 2 = 2, and the change is said.
    train(make_cfg(tmp_path, tiny_dataset, name="a", epochs=3, overrides=["Optimizer.lr.warmup_epoch=0"]))
    train(make_cfg(tmp_path, tiny_dataset, name="b", epochs=3, overrides=[
        "Optimizer.lr.warmup_epoch=0", f"Global.checkpoints={tmp_path / 'a' / 'epoch_1'}",
        "DataLoader.Train.sampler.batch_size=6"]))
    log = (tmp_path / "b" / "train.log").read_text()
    assert "optimizer steps per epoch changed from 3 to 2" in log and "continues from step 2" in log
    assert load_checkpoint(tmp_path / "b" / "latest")["states"]["train_state"]["global_step"] == 6


def test_auto_resume_prefers_latest_over_the_original_checkpoint(tmp_path, tiny_dataset):
    train(make_cfg(tmp_path, tiny_dataset, name="src", epochs=3, overrides=["Optimizer.lr.warmup_epoch=0"]))
    first = ["Optimizer.lr.warmup_epoch=0", "Global.auto_resume=True",
             f"Global.checkpoints={tmp_path / 'src' / 'epoch_1'}"]
    train(make_cfg(tmp_path, tiny_dataset, name="job", epochs=2, overrides=first))
    result = train(make_cfg(tmp_path, tiny_dataset, name="job", epochs=3, overrides=first))
    log = (tmp_path / "job" / "train.log").read_text()
    assert f"resumed from {tmp_path / 'src' / 'epoch_1'}" in log  # the first start
    assert f"resumed from {tmp_path / 'job' / 'latest'}" in log  # the restart: no epoch repeated
    assert [r["epoch"] for r in result["history"]] == [1, 2, 3]
