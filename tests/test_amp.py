"""Mixed precision (the PaddleClas ``AMP`` section plus ``dtype``), exercised on the CPU in
bfloat16: O1 and O2 train, eval, save and resume; checkpoints float32; O2 evaluates under
autocast; the loss scaler exists for float16 only; fp16 on a CPU is a warning and fp32."""
import numpy as np
import paddle
import pytest

from ppcls_ft.engine.amp import AmpPolicy, amp_policy
from ppcls_ft.engine.checkpoint import float32_state, load_checkpoint
from ppcls_ft.engine.run import evaluate_config, train
from ppcls_ft.errors import ConfigError
from test_trainer import make_cfg


def test_float16_on_cpu_is_a_warning_and_fp32(tmp_path, tiny_dataset, capsys):
    from ppcls_ft.engine.builder import build_train_parts
    cfg = make_cfg(tmp_path, tiny_dataset, name="amp", epochs=1,
                   overrides=["AMP={use_amp: True, level: O1}", "Optimizer.lr.warmup_epoch=0"])
    parts = build_train_parts(cfg)
    assert parts.scaler is None and not parts.amp.enabled
    assert "float16, which needs a GPU; training in fp32" in capsys.readouterr().out


def test_policy_from_the_paddleclas_section():
    gpu = amp_policy({"use_amp": True, "level": "O2", "scale_loss": 128.0,
                      "use_dynamic_loss_scaling": True}, "gpu")
    assert (gpu.enabled, gpu.level, gpu.dtype, gpu.use_promote) == (True, "O2", "float16", False)
    assert gpu.scaler_kwargs == {"init_loss_scaling": 128.0, "use_dynamic_loss_scaling": True}
    assert isinstance(gpu.make_scaler(), paddle.amp.GradScaler)
    bf16 = amp_policy({"level": "O1", "dtype": "bfloat16"}, "gpu")
    assert bf16.enabled and bf16.make_scaler() is None  # bf16 needs no loss scaling
    assert not amp_policy({"use_amp": False}, "gpu").enabled and not amp_policy(None, "gpu").enabled
    with pytest.raises(ConfigError, match="AMP.level"):
        amp_policy({"level": "O3"}, "gpu")
    with pytest.raises(ConfigError, match="AMP.dtype"):
        amp_policy({"dtype": "int8"}, "gpu")


def test_autocast_in_eval_follows_level_and_use_fp16_test():
    import contextlib
    o1 = AmpPolicy(enabled=True, level="O1", dtype="bfloat16")
    o1_test = AmpPolicy(enabled=True, level="O1", dtype="bfloat16", use_fp16_test=True)
    o2 = AmpPolicy(enabled=True, level="O2", dtype="bfloat16")
    assert isinstance(o1.autocast(training=False), contextlib.nullcontext)
    assert not isinstance(o1.autocast(training=True), contextlib.nullcontext)
    assert not isinstance(o1_test.autocast(training=False), contextlib.nullcontext)
    assert not isinstance(o2.autocast(training=False), contextlib.nullcontext)
    assert isinstance(AmpPolicy().autocast(), contextlib.nullcontext)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_bf16_train_eval_save_resume(tmp_path, tiny_dataset, level, monkeypatch):
    amp = f"AMP={{use_amp: True, level: {level}, dtype: bfloat16}}"
    calls = []
    real = paddle.amp.auto_cast

    def spy(*args, **kwargs):
        calls.append((kwargs.get("level"), kwargs.get("dtype")))
        return real(*args, **kwargs)

    monkeypatch.setattr(paddle.amp, "auto_cast", spy)
    full = train(make_cfg(tmp_path, tiny_dataset, name="full", epochs=3, overrides=[amp]))
    assert np.isfinite(full["history"][-1]["train_loss"]) and "eval_top1" in full["history"][-1]
    # train steps, and for O2 the eval batches too, ran under autocast(level, bfloat16):
    # 3 epochs x 3 train batches, + 3 x 2 eval batches at O2
    assert calls.count((level, "bfloat16")) == 9 + (6 if level == "O2" else 0)
    log = (tmp_path / "full" / "train.log").read_text()
    assert f"AMP {level} bfloat16 on the CPU" in log and "float32 arithmetic" in log
    ck = load_checkpoint(tmp_path / "full" / "latest")
    assert {str(v.dtype) for v in ck["params"].values()} <= {"float32", "int64", "int32"}
    # resume from epoch_1 reproduces the uninterrupted run
    train(make_cfg(tmp_path, tiny_dataset, name="part", epochs=3, overrides=[
        amp, f"Global.checkpoints={tmp_path / 'full' / 'epoch_1'}"]))
    part = load_checkpoint(tmp_path / "part" / "latest")
    for key, value in ck["params"].items():
        np.testing.assert_allclose(part["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # the fp32 checkpoint evaluates in a plain fp32 run (no AMP section)
    plain = make_cfg(tmp_path, tiny_dataset, name="eval", epochs=1, overrides=[
        f"Global.pretrained_model={tmp_path / 'full' / 'latest'}"])
    assert evaluate_config(plain)["top1"] == pytest.approx(full["history"][-1]["eval_top1"])


def test_low_precision_weights_are_saved_as_float32_and_resumed_into_place():
    """What O2 does on a GPU (fp16/bf16 parameters), emulated by casting: the checkpoint is
    float32 and an exact load writes into the live low-precision tensors."""
    from ppcls_ft.models import build_model
    from ppcls_ft.models._builder import load_state_exact
    model = build_model({"name": "PPLCNet_x0_25", "class_num": 3}, load_weights=False)
    reference = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    model.to(dtype="bfloat16")
    state = float32_state(model)
    assert {str(v.dtype) for v in state.values()} == {"paddle.float32"}
    for key, value in state.items():  # bf16 keeps ~3 significant digits
        np.testing.assert_allclose(value.numpy(), reference[key], rtol=1e-2, atol=1e-2, err_msg=key)
    load_state_exact(model, reference, "ref.pdparams")
    w = model.state_dict(use_hook=False)["fc.weight"]
    assert w.dtype == paddle.bfloat16
    np.testing.assert_allclose(w.astype("float32").numpy(), reference["fc.weight"], rtol=1e-2, atol=1e-3)


def test_check_gpu_script_runs_its_amp_checks_on_the_cpu(tmp_path, capsys):
    """tools/check_gpu.py is what a GPU owner runs; on the CPU it takes the bfloat16 path."""
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("check_gpu", REPO / "tools" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--only", "amp", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS  AMP O1 train+eval+export" in out and "PASS  AMP O2 train+eval+export" in out
    assert '"export_top1_agreement": "16/16"' in out and "2 passed, 0 failed" in out
