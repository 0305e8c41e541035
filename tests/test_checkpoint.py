"""Checkpoints are written atomically and read back safely."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import paddle
import pytest

from ppcls_ft.engine import checkpoint as ck
from ppcls_ft.errors import WeightsError


def _state(value, n=1000):
    return {"w": paddle.full([n], float(value)), "b": paddle.full([3], float(value))}


def test_round_trip_and_prefix_forms(tmp_path):
    prefix = tmp_path / "epoch_1"
    ck.save_checkpoint(prefix, _state(1), {"lr": 0.1}, {"epoch": 1, "best_top1": 0.5})
    for name in (prefix, str(prefix) + ".pdparams"):
        parts = ck.load_checkpoint(name)
        assert parts["states"] == {"epoch": 1, "best_top1": 0.5}
        np.testing.assert_array_equal(parts["params"]["w"], np.ones(1000, "float32"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pdopt", "epoch_1.pdparams", "epoch_1.pdstates"]


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    prefix = tmp_path / "latest"
    ck.save_checkpoint(prefix, _state(1), {"lr": 0.1}, {"epoch": 1})
    real_save = ck.portable_save.save
    calls = []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the optimizer file: write half of it, then die
            with open(path, "wb") as f:
                f.write(b"\x80\x04partial")
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.portable_save, "save", failing_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(prefix, _state(2), {"lr": 0.2}, {"epoch": 2})
    parts = ck.load_checkpoint(prefix)
    assert parts["states"]["epoch"] == 1
    np.testing.assert_array_equal(parts["params"]["w"], np.ones(1000, "float32"))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_kill_during_save_never_leaves_a_truncated_file(tmp_path):
    """SIGKILL a process that saves a 40 MB checkpoint in a loop; every final file must load."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(os.getcwd())!r})
        import paddle
        from ppcls_ft.engine.checkpoint import save_checkpoint
        state = {{"w": paddle.ones([10_000_000])}}
        i = 0
        while True:
            i += 1
            save_checkpoint({str(tmp_path / 'latest')!r}, state, {{"i": i}}, {{"epoch": i}})
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete save exists
        time.sleep(0.35)  # now most likely in the middle of another save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    parts = ck.load_checkpoint(tmp_path / "latest")
    assert parts["params"]["w"].shape == (10_000_000,)
    assert parts["states"]["epoch"] >= 1


def test_missing_or_incomplete_checkpoint_errors_name_the_key(tmp_path):
    with pytest.raises(WeightsError, match="Global.checkpoints"):
        ck.load_checkpoint(tmp_path / "nothing")
    paddle.save(_state(1), str(tmp_path / "only.pdparams"))
    with pytest.raises(WeightsError, match="pretrained_model"):
        ck.load_checkpoint(tmp_path / "only")


def test_checkpoint_cannot_run_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ck.save_checkpoint(tmp_path / "x", _state(1), {"lr": 0.1}, {"epoch": 1})
    with open(tmp_path / "x.pdstates", "wb") as f:
        pickle.dump({"epoch": Evil()}, f)
    with pytest.raises(WeightsError, match="forbidden"):
        ck.load_checkpoint(tmp_path / "x")
    assert not (tmp_path / "pwned").exists()


def test_paddleclas_ema_checkpoint_is_read_the_right_way_round(tmp_path):
    """PaddleClas's save_model writes the EMA weights to .pdparams and the model to .pdema."""
    import paddle
    from ppcls_ft.engine.checkpoint import read_checkpoint
    ema_w, model_w = np.full((2, 2), 1.0, np.float32), np.full((2, 2), 2.0, np.float32)
    prefix = tmp_path / "latest"
    paddle.save({"fc.weight": ema_w}, f"{prefix}.pdparams")
    paddle.save({"fc.weight": model_w}, f"{prefix}.pdema")
    paddle.save([{"fc.w_0_velocity_0": np.zeros((2, 2), np.float32)}], f"{prefix}.pdopt")
    paddle.save({"metric": 0.5, "epoch": 3}, f"{prefix}.pdstates")
    ck = read_checkpoint(prefix, steps_per_epoch=10, seed=4)
    assert ck.source == "PaddleClas" and ck.opt == {"fc.w_0_velocity_0": ck.opt["fc.w_0_velocity_0"]}
    np.testing.assert_array_equal(ck.params["fc.weight"], model_w)
    np.testing.assert_array_equal(ck.ema["fc.weight"], ema_w)
    assert ck.train_state["epoch"] == 3 and ck.train_state["global_step"] == 30
    assert ck.train_state["seed"] == 4 and ck.train_state["best_top1"] == 0.5
    assert any("other way round" in n for n in ck.notes)
