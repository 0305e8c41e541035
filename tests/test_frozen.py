"""Frozen means cheap (engine/frozen.py): a frozen backbone runs forward-only, and its features
are computed once when no random transform or batch operator touches them."""
import os
import signal

import numpy as np

from ppcls_ft.data.dataset import ImageNetDataset
from ppcls_ft.engine import frozen
from ppcls_ft.engine.builder import build_train_parts
from ppcls_ft.engine.trainer import Trainer
from test_trainer import make_cfg

FIXED_TRAIN = ("DataLoader.Train.dataset.transform_ops=[{DecodeImage: {to_rgb: True}}, "
               "{ResizeImage: {resize_short: 32}}, {CropImage: {size: 32}}, "
               "{NormalizeImage: {scale: 0.00392157, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], order: ''}}]")
PROBE = ["FineTune.linear_probe=True", "Optimizer.lr.warmup_epoch=0"]


def _log(tmp_path, name):
    return (tmp_path / name / "train.log").read_text()


def _train(tmp_path, tiny_dataset, name, overrides, plan=None, monkeypatch=None, epochs=2):
    cfg = make_cfg(tmp_path, tiny_dataset, name=name, epochs=epochs, overrides=overrides)
    parts = build_train_parts(cfg)
    trainer = Trainer(parts)
    if plan is not None:
        monkeypatch.setattr(trainer.frozen, "plan", plan(trainer.frozen))
    before = {k: v.numpy().copy() for k, v in parts.model.state_dict().items()}
    result = trainer.fit()
    after = {k: v.numpy() for k, v in parts.model.state_dict().items()}
    return trainer, before, after, result


def test_cached_features_train_the_head_exactly_as_the_forward_only_path(tmp_path, tiny_dataset,
                                                                           monkeypatch):
    cached, before, after, _ = _train(tmp_path, tiny_dataset, "cached", PROBE + [FIXED_TRAIN])
    assert cached.frozen.features is not None and cached.frozen.features.shape[0] == 12
    assert "features of 12 train images are cached" in _log(tmp_path, "cached")
    # the same epochs with the cache refused: every batch's images through the backbone
    _, _, ref, _ = _train(tmp_path, tiny_dataset, "uncached", PROBE + [FIXED_TRAIN],
                          plan=lambda fb: lambda epoch: (fb._forward_only, None), monkeypatch=monkeypatch)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    for key in after:  # same batches in the same order, same features, same head steps
        np.testing.assert_allclose(after[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_cache_reader_workers_leave_sigterm_to_the_trainer(tmp_path, tiny_dataset, monkeypatch):
    """A scheduler signals the whole process group: every loader worker, the feature cache's
    too, gets the SIGTERM. Here each worker process sends it to itself at its first image; a
    worker that did not ignore it would die and take the cache (and the run) with it."""
    main, read = os.getpid(), ImageNetDataset.__getitem__
    signalled = []  # per process: a forked worker starts with the parent's empty list

    def getitem(self, idx):
        if os.getpid() != main and not signalled:
            signalled.append(idx)
            os.kill(os.getpid(), signal.SIGTERM)
        return read(self, idx)

    monkeypatch.setattr(ImageNetDataset, "__getitem__", getitem)
    trainer, _, _, result = _train(tmp_path, tiny_dataset, "signalled",
                                   PROBE + [FIXED_TRAIN, "DataLoader.Train.loader.num_workers=2"],
                                   epochs=1)
    assert trainer.frozen.features is not None and trainer.frozen.features.shape[0] == 12
    assert (trainer.frozen.labels >= 0).all() and result["stopped_by"] is None


def test_random_transforms_mean_forward_only_and_say_why(tmp_path, tiny_dataset):
    trainer, before, after, _ = _train(tmp_path, tiny_dataset, "random", PROBE, epochs=1)
    assert trainer.frozen.features is None
    assert ("forward-only (no cache: the train transforms include RandCropImage, RandFlipImage)"
            in _log(tmp_path, "random"))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_the_cache_respects_its_memory_budget(tmp_path, tiny_dataset):
    trainer, *_ = _train(tmp_path, tiny_dataset, "budget",
                         PROBE + [FIXED_TRAIN, "FineTune.feature_cache_mb=0.001"], epochs=1)
    assert trainer.frozen.features is None
    assert "more than FineTune.feature_cache_mb 0.001" in _log(tmp_path, "budget")


def test_an_unreadable_image_is_skipped_from_the_cache(tmp_path, tiny_dataset):
    root, lst, _ = tiny_dataset
    first = lst.read_text().splitlines()[0].split()[0]
    (root / first).write_bytes(b"not a jpeg")
    trainer, _, _, result = _train(tmp_path, tiny_dataset, "broken", PROBE + [FIXED_TRAIN])
    assert (trainer.frozen.labels == -1).sum() == 1
    assert [r["skipped_images"] for r in result["history"]] == [1, 1]


def test_freeze_then_unfreeze_caches_only_the_frozen_epochs(tmp_path, tiny_dataset):
    cfg = make_cfg(tmp_path, tiny_dataset, name="fz", epochs=2,
                   overrides=["FineTune.freeze_backbone_epochs=1", FIXED_TRAIN])
    parts = build_train_parts(cfg)
    trainer = Trainer(parts)
    s0 = {k: v.numpy().copy() for k, v in parts.model.state_dict().items()}
    trainer.train_epoch(1)
    assert trainer.frozen.features is not None
    s1 = {k: v.numpy().copy() for k, v in parts.model.state_dict().items()}
    assert all(np.array_equal(s0[k], s1[k]) for k in s0 if not k.startswith("fc."))
    trainer.train_epoch(2)  # its plan() frees the cache once the backbone trains for good
    assert not parts.strategy.frozen and trainer.frozen.features is None
    s2 = {k: v.numpy() for k, v in parts.model.state_dict().items()}
    assert not np.array_equal(s1["conv1.conv.weight"], s2["conv1.conv.weight"])


def test_cache_blockers():
    fixed = {"DataLoader": {"Train": {"dataset": {"transform_ops": [{"DecodeImage": None},
                                                                    {"NormalizeImage": {}}]}}}}
    assert frozen.cache_blocker(fixed, None) is None
    assert "batch operator" in frozen.cache_blocker(fixed, object())
    jitter = {"DataLoader": {"Train": {"dataset": {"transform_ops": [{"ColorJitter": {}}]}}}}
    assert "ColorJitter" in frozen.cache_blocker(jitter, None)
    resize = {"DataLoader": {"Train": {"dataset": {"transform_ops": [
        {"ResizeImage": {"resize_short": 32, "interpolation": "random"}}]}}}}
    assert "ResizeImage" in frozen.cache_blocker(resize, None)  # bilinear or bicubic per call


def test_a_frozen_backbone_is_in_eval_mode_its_dropout_too(tmp_path, tiny_dataset):
    """On any number of processes (strategies.train_mode), so 1 and N processes train alike."""
    cfg = make_cfg(tmp_path, tiny_dataset, name="modes", epochs=2,
                   overrides=["FineTune.freeze_backbone_epochs=1"])
    parts = build_train_parts(cfg)
    model, strategy = parts.model, parts.strategy
    strategy.begin_epoch(model, 1)
    strategy.train_mode(model)
    assert not model.dropout.training and not model.blocks2[0].dw_conv.bn.training
    assert model.fc.training
    strategy.begin_epoch(model, 2)
    strategy.train_mode(model)
    assert model.dropout.training and model.blocks2[0].dw_conv.bn.training
