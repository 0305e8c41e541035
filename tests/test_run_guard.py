"""A run stopped by SIGTERM ends between steps with its checkpoints intact; two runs into one
output folder: the second stops at once, naming the folder and the pid of the first."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tiny_dataset
from test_trainer import TINY, make_cfg

from ppcls_ft.engine import checkpoint as ck
from ppcls_ft.engine.run import train

REPO = Path(__file__).resolve().parents[1]


def long_run_cfg(tmp_path, epochs=40, workers=0):
    """A config whose run lasts long enough to be signalled mid-epoch (30 iterations/epoch)."""
    root, lst, _ = write_tiny_dataset(tmp_path / "data", per_class=40)
    path = tmp_path / "long.yaml"
    text = TINY.format(out=tmp_path / "out", root=root, lst=lst, epochs=epochs, vdl=False)
    text = text.replace("warmup_epoch: 1", "warmup_epoch: 0")
    path.write_text(text.replace("num_workers: 0", f"num_workers: {workers}"))
    return path


def start_train(cfg_path, *overrides):
    """tools/train.py in a session of its own, so its process group can be signalled, as a
    scheduler signals a job's processes (loader workers included)."""
    args = [a for o in overrides for a in ("-o", o)]
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(cfg_path),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)


def wait_for_line(proc, needle, timeout=120):
    """Read ``proc``'s stdout up to the first line holding ``needle``; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"{needle!r} never appeared; output:\n{''.join(lines)}")


def snapshot(prefix):
    """Bytes of every file of checkpoint ``prefix``."""
    return {s: Path(str(prefix) + s).read_bytes() for s in (".pdparams", ".pdopt", ".pdstates")}


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_ends_fast_keeps_checkpoints_and_says_how_to_resume(tmp_path, workers):
    cfg = long_run_cfg(tmp_path, workers=workers)
    out = tmp_path / "out"
    proc = start_train(cfg)
    try:
        wait_for_line(proc, "[Train][Epoch 2/40][Iter: 3/30]")
        before = snapshot(out / "latest")  # epoch 1, saved before epoch 2 began
        sent = time.time()
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its loader workers
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.time() - sent
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert took < 10, f"took {took:.1f} s to stop"
    assert "Traceback" not in stdout + stderr and "Error" not in stderr, stderr
    stop_lines = [line for line in stdout.splitlines() if "stopped by SIGTERM" in line]
    assert len(stop_lines) == 1, stdout
    assert "during epoch 2, iteration" in stop_lines[0]
    assert f"Global.checkpoints={out / 'latest'}" in stop_lines[0]
    assert "Global.auto_resume=True" in stop_lines[0]
    assert snapshot(out / "latest") == before  # the abandoned epoch wrote nothing
    assert ck.load_checkpoint(out / "latest")["states"]["epoch"] == 1
    assert not list(out.glob("*.tmp*"))
    results = json.loads((out / "train_results.json").read_text())
    assert results["stopped_by"] == "SIGTERM" and len(results["epochs"]) == 1

    # What the log line says to do works: the run continues from epoch 2.
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(cfg),
                           "-o", "Global.auto_resume=True", "-o", "Global.epochs=2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout and "[Train][Epoch 2/2]" in done.stdout
    assert "[Train][Epoch 1/2]" not in done.stdout
    assert ck.load_checkpoint(out / "latest")["states"]["epoch"] == 2


def test_second_run_into_the_same_output_dir_stops_naming_dir_and_pid(tmp_path):
    cfg = long_run_cfg(tmp_path)
    out = tmp_path / "out"
    first = start_train(cfg)
    try:
        wait_for_line(first, "[Train][Epoch 1/40][Iter: 2/30]")
        log_before = (out / "train.log").read_bytes()
        config_before = (out / "config.yaml").read_bytes()
        second = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(cfg),
                                 "-o", "Global.seed=9"], capture_output=True, text=True, timeout=120)
        # Still running, and the second run wrote nothing into the folder.
        assert first.poll() is None
        assert (out / "config.yaml").read_bytes() == config_before
        assert (out / "train.log").read_bytes()[:len(log_before)] == log_before
        assert "seed: 9" not in (out / "train.log").read_text()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert second.returncode == 2, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Global.output_dir: "), second.stderr
    assert str(out) in lines[0] and f"pid {first.pid}" in lines[0]
    assert "Traceback" not in second.stdout + second.stderr

    # Once the first run has ended the lock is free again (the kernel released it).
    third = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(cfg),
                            "-o", "Global.epochs=1"], capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr


def test_sigterm_during_a_save_lets_the_save_finish(tmp_path, tiny_dataset, monkeypatch):
    """The signal lands inside the save of epoch 1's ``latest``: that save completes, and the run
    stops before epoch 2's first step."""
    cfg = make_cfg(tmp_path, tiny_dataset, name="sig", epochs=3)
    real_save = ck.portable_save.save
    signalled = []

    def save_then_signal(obj, path):
        if ".pdparams.tmp" in str(path) and "latest" in str(path) and not signalled:
            signalled.append(path)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now, mid-save
        return real_save(obj, path)

    monkeypatch.setattr(ck.portable_save, "save", save_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    result = train(cfg)
    assert signal.getsignal(signal.SIGTERM) is previous  # the guard restored the handler
    assert signalled and result["stopped_by"] == "SIGTERM"
    assert [r["epoch"] for r in result["history"]] == [1]
    latest = ck.load_checkpoint(tmp_path / "sig" / "latest")
    assert latest["states"]["epoch"] == 1
    assert set(latest["params"]) == set(ck.load_checkpoint(tmp_path / "sig" / "epoch_1")["params"])
    for key, value in latest["params"].items():
        np.testing.assert_array_equal(value, ck.load_checkpoint(tmp_path / "sig" / "epoch_1")["params"][key])


def test_lock_file_names_the_holder(tmp_path):
    from ppcls_ft.engine.run_guard import run_guard
    from ppcls_ft.errors import ConfigError

    with run_guard(tmp_path / "out"):
        assert (tmp_path / "out" / ".lock").read_text().strip() == str(os.getpid())
        # flock locks belong to an open file description: a second open in this process conflicts too
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()} holds"):
            with run_guard(tmp_path / "out"):
                pass
    with run_guard(tmp_path / "out"):  # released on exit
        pass
