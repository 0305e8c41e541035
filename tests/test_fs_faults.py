"""Real filesystem faults during saves and runs: disk full (a small tmpfs), file too large
(RLIMIT_FSIZE), a read-only destination (a read-only remount), a kill between the renames of a
save. Each time the error names the file, and the previous ``latest`` loads and equals what it was.

tmpfs and remounts need root with CAP_SYS_ADMIN; those tests skip with the reason otherwise.
"""
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppcls_ft.engine import checkpoint as ck
from ppcls_ft.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".pdparams", ".pdopt", ".pdstates")


def _mount(*args):
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs at ``tmp_path/fs``; yields (path, remount(options))."""
    where = tmp_path / "fs"
    where.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")

    def remount(options):
        res = _mount("-o", f"remount,{options}", str(where))
        assert res.returncode == 0, res.stderr

    try:
        yield where, remount
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder, leave_bytes):
    """Fill the filesystem of ``folder`` until about ``leave_bytes`` are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def snapshot(prefix):
    return {s: Path(str(prefix) + s).read_bytes() for s in SUFFIXES}


def params(n, value):
    return {"w": paddle.full([n], float(value))}


def assert_previous_intact(prefix, before, epoch):
    assert snapshot(prefix) == before
    loaded = ck.load_checkpoint(prefix)
    assert loaded["states"]["epoch"] == epoch
    np.testing.assert_array_equal(loaded["params"]["w"], np.full_like(loaded["params"]["w"], epoch))
    assert not [p for p in Path(prefix).parent.iterdir() if ".tmp" in p.name]


def test_disk_full_while_writing_the_second_file_replaces_nothing(small_fs):
    folder, _ = small_fs
    prefix = folder / "latest"
    ck.save_checkpoint(prefix, params(1000, 1), {"m": np.zeros(1000, "float32")}, {"epoch": 1})
    before = snapshot(prefix)
    fill(folder, 200_000)
    # .pdparams (40 kB) fits; .pdopt (1.2 MB) does not: the failure is in the 2nd of the files.
    with pytest.raises(OSError) as info:
        ck.save_checkpoint(prefix, params(10_000, 2), {"m": np.zeros(300_000, "float32")}, {"epoch": 2})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == f"{prefix}.pdopt"  # the final name, not the temporary one
    assert_previous_intact(prefix, before, 1)


def test_file_too_large_fails_cleanly(tmp_path):
    """RLIMIT_FSIZE with SIGXFSZ ignored: a write past the limit fails with EFBIG."""
    prefix = tmp_path / "latest"
    ck.save_checkpoint(prefix, params(1000, 1), {"m": 0}, {"epoch": 1})
    before = snapshot(prefix)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        import numpy as np, paddle
        from ppcls_ft.engine.checkpoint import save_checkpoint
        try:
            save_checkpoint({str(prefix)!r}, {{"w": paddle.full([1000], 2.0)}},
                            {{"m": np.zeros(100_000, "float32")}}, {{"epoch": 2}})
        except OSError as exc:
            print(exc.errno, exc.filename)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(errno.EFBIG), f"{prefix}.pdopt"], out.stdout + out.stderr
    assert_previous_intact(prefix, before, 1)


def test_read_only_destination_fails_naming_the_file(small_fs):
    folder, remount = small_fs
    prefix = folder / "latest"
    ck.save_checkpoint(prefix, params(1000, 1), {"m": 0}, {"epoch": 1})
    before = snapshot(prefix)
    remount("ro")
    with pytest.raises(OSError) as info:
        ck.save_checkpoint(prefix, params(1000, 2), {"m": 0}, {"epoch": 2})
    assert info.value.errno == errno.EROFS and info.value.filename == f"{prefix}.pdparams"
    assert_previous_intact(prefix, before, 1)


def test_kill_between_renames_is_completed_on_load(tmp_path):
    """SIGKILL after the first rename of a save: the next read finishes that save from the
    temporary files the kill left behind, so the four files are one set again."""
    prefix = tmp_path / "latest"
    ck.save_checkpoint(prefix, params(1000, 1), {"m": 1}, {"epoch": 1}, {"w": paddle.full([1000], 1.0)})
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import paddle
        from ppcls_ft.engine import checkpoint as ck
        real, calls = os.replace, []
        def replace_then_die(src, dst):
            real(src, dst)
            calls.append(dst)
            if len(calls) == 1:  # .pdparams is new, .pdopt/.pdema/.pdstates are still the old ones
                os.kill(os.getpid(), signal.SIGKILL)
        ck.os.replace = replace_then_die
        ck.save_checkpoint({str(prefix)!r}, {{"w": paddle.full([1000], 2.0)}}, {{"m": 2}},
                           {{"epoch": 2}}, {{"w": paddle.full([1000], 2.0)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(list(tmp_path.glob("latest.*.tmp*"))) == 3  # what the kill left
    loaded = ck.load_checkpoint(prefix)
    assert loaded["states"]["epoch"] == 2 and loaded["opt"]["m"] == 2
    np.testing.assert_array_equal(loaded["ema"]["w"], np.full(1000, 2.0, "float32"))
    assert not list(tmp_path.glob("latest.*.tmp*"))


def test_leftovers_of_a_killed_save_go_with_the_next_save(tmp_path):
    prefix = tmp_path / "latest"
    for suffix in (".pdparams", ".pdstates"):  # what a kill in the middle of writing leaves
        Path(f"{prefix}{suffix}.tmp99999").write_bytes(b"\x80\x04partial")
    (tmp_path / "other.pdparams.tmp99999").write_bytes(b"not ours")
    ck.save_checkpoint(prefix, params(10, 1), {"m": 1}, {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.pdopt", "latest.pdparams", "latest.pdstates", "other.pdparams.tmp99999"]


def test_mismatched_set_without_leftovers_is_refused_by_name(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    ck.save_checkpoint(one, params(1000, 1), {"m": 1}, {"epoch": 1})
    ck.save_checkpoint(two, params(1000, 2), {"m": 2}, {"epoch": 2})
    os.replace(f"{two}.pdparams", f"{one}.pdparams")  # same size, other content
    with pytest.raises(WeightsError, match=rf"{one}.pdparams missing or not the file\(s\) saved with {one}.pdstates"):
        ck.load_checkpoint(one)


def test_stale_ema_of_an_earlier_save_is_not_loaded(tmp_path):
    prefix = tmp_path / "latest"
    ck.save_checkpoint(prefix, params(10, 1), {"m": 1}, {"epoch": 1}, {"w": paddle.full([10], 1.0)})
    ck.save_checkpoint(prefix, params(10, 2), {"m": 2}, {"epoch": 2})  # EMA off now
    assert ck.load_checkpoint(prefix)["ema"] is None


# ------------------------------------------------------------------ through tools/train.py
TOOL = [sys.executable, str(REPO / "tools" / "train.py")]


def train_tool(cfg, *overrides, preexec=None):
    args = [a for o in overrides for a in ("-o", o)]
    return subprocess.run(TOOL + ["-c", str(cfg), *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


@pytest.fixture
def tiny_cfg(tmp_path, tiny_dataset):
    from test_trainer import TINY
    root, lst, _ = tiny_dataset
    path = tmp_path / "tiny.yaml"
    text = TINY.format(out=tmp_path / "unused", root=root, lst=lst, epochs=1, vdl=False)
    path.write_text(text.replace("warmup_epoch: 1", "warmup_epoch: 0"))
    return path


def one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_train_on_a_full_disk_stops_with_one_line_and_keeps_latest(small_fs, tiny_cfg):
    folder, _ = small_fs
    out = folder / "out"
    first = train_tool(tiny_cfg, f"Global.output_dir={out}", "Global.save_interval=0")
    assert first.returncode == 0, first.stdout + first.stderr
    before = snapshot(out / "latest")
    fill(folder, 50_000)
    second = train_tool(tiny_cfg, f"Global.output_dir={out}", "Global.epochs=2",
                        "Global.auto_resume=True", "Global.save_interval=0")
    one_error_line(second, "Global.output_dir", str(out), "No space left on device")
    assert snapshot(out / "latest") == before
    assert ck.load_checkpoint(out / "latest")["states"]["epoch"] == 1
    assert not list(out.glob("*.tmp*"))


def test_train_with_a_file_size_limit_stops_with_one_line_and_keeps_latest(tmp_path, tiny_cfg):
    import resource
    import signal
    out = tmp_path / "out"
    first = train_tool(tiny_cfg, f"Global.output_dir={out}")
    assert first.returncode == 0, first.stdout + first.stderr
    before = snapshot(out / "latest")

    def limit():  # in the child: checkpoint files (~1 MB) exceed it, the log and config do not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    second = train_tool(tiny_cfg, f"Global.output_dir={out}", "Global.epochs=2",
                        "Global.auto_resume=True", preexec=limit)
    one_error_line(second, "Global.output_dir", str(out), "File too large")
    assert snapshot(out / "latest") == before
    assert not list(out.glob("*.tmp*"))


def test_train_into_a_read_only_folder_stops_before_writing(small_fs, tiny_cfg):
    folder, remount = small_fs
    out = folder / "out"
    first = train_tool(tiny_cfg, f"Global.output_dir={out}", "Global.save_interval=0")
    assert first.returncode == 0, first.stdout + first.stderr
    before = snapshot(out / "latest")
    remount("ro")
    second = train_tool(tiny_cfg, f"Global.output_dir={out}", "Global.epochs=2",
                        "Global.auto_resume=True")
    one_error_line(second, "Global.output_dir", str(out), "Read-only file system")
    assert snapshot(out / "latest") == before


def test_output_dir_that_cannot_be_created_names_it(small_fs, tiny_cfg):
    folder, remount = small_fs
    remount("ro")
    target = folder / "new" / "out"
    proc = train_tool(tiny_cfg, f"Global.output_dir={target}")
    one_error_line(proc, "Global.output_dir", str(folder / "new"), "Read-only file system")
