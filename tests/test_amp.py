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


@pytest.mark.parametrize("ml_dtypes", [False, True], ids=["numpy", "ml_dtypes-imported"])
def test_low_precision_weights_are_saved_as_float32_and_resumed_into_place(ml_dtypes):
    """What O2 does on a GPU (fp16/bf16 parameters), emulated by casting: the checkpoint is
    float32 and an exact load writes into the live low-precision tensors. Also once ml_dtypes is
    imported (onnx imports it), which gives numpy a bfloat16 dtype that Paddle refuses."""
    if ml_dtypes:
        pytest.importorskip("ml_dtypes", reason="the [cpu] extra installs it (through onnx)")
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


def _fp16_adam(seed):
    from ppcls_ft.optim.optimizer import materialize_accumulators
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():  # the same generated names, as in a fresh process
        lin = paddle.nn.Linear(4, 3)
        lin.to(dtype="float16")  # what O2 does to the weights on a GPU
        opt = paddle.optimizer.Adam(0.1, parameters=lin.parameters(), multi_precision=True)
        materialize_accumulators(opt)
    return lin, opt


def test_o2_master_weights_resume_into_the_optimizers_own_tensors(tmp_path):
    """The fp32 master copies come back by name into the optimizer's tensors (Paddle looks up
    accumulators by the master's name), and without saved masters they follow the parameters."""
    from ppcls_ft.optim.optimizer import load_optimizer_state
    from ppcls_ft.utils import portable_save
    from ppcls_ft.utils.safe_pickle import safe_load, unwrap_tensors
    lin, opt = _fp16_adam(0)
    for name, mw in opt._master_weights.items():
        mw.set_value(np.full(mw.shape, 0.25, np.float32))  # distinct from the fp16 params
    portable_save.save(opt.state_dict(), str(tmp_path / "x.pdopt"))
    state = unwrap_tensors(safe_load(str(tmp_path / "x.pdopt")))
    lin2, opt2 = _fp16_adam(1)
    own = dict(opt2._master_weights)
    assert load_optimizer_state(opt2, state, "x.pdopt") is None
    for name, mw in opt2._master_weights.items():
        assert mw is own[name]  # the same, named tensor: accumulators are found by its name
        np.testing.assert_array_equal(mw.numpy(), 0.25)
    for p in lin2.parameters():
        opt2._get_accumulator_master("moment1", p)  # raises if the names were lost
    # no saved masters (a PaddleClas .pdopt, names of another process): masters = parameters
    lin3, opt3 = _fp16_adam(2)
    note = load_optimizer_state(opt3, {"LR_Scheduler": {}, "other_moment1_0": np.zeros(3)}, "pc",
                                strict=False)
    assert note and "not restored" in note
    for p in lin3.parameters():
        np.testing.assert_array_equal(opt3._master_weights[p.name].numpy(), p.astype("float32").numpy())
