"""Checkpoint files keep paddle.save's format and load under numpy 1.x (PaddleClas) and numpy 2."""
import json
import os
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppcls_ft.engine.checkpoint import FILES_KEY, load_checkpoint, save_checkpoint
from ppcls_ft.utils import portable_save
from ppcls_ft.utils.safe_pickle import safe_load

PROBE = Path(__file__).with_name("pickle_probe.py")
# Every global a checkpoint may name; each exists in numpy 1.24 and in numpy 2.
PORTABLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "tuple")}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def pickle_globals(data):
    """(module, name) of every GLOBAL / STACK_GLOBAL in a pickle, following memoized strings."""
    refs, memo, pushed = set(), {}, []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            refs.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            refs.add((pushed[-2], pushed[-1]))
        if op.name in _STRING_OPS:
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op.name not in ("FRAME", "PROTO"):
            pushed.append(None)  # anything else puts a non-string on the stack (or pops)
    return refs


def checkpoint_parts():
    """A small but real model/optimizer/EMA state plus loop state like the Trainer's."""
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    opt = paddle.optimizer.Momentum(0.1, parameters=model.parameters())
    model(paddle.randn([2, 3, 8, 8])).mean().backward()
    opt.step()
    states = {"epoch": 2, "global_step": 8, "best_top1": 0.5, "best_epoch": None, "seed": 3,
              "history": [{"epoch": 1, "eval_top1": 0.25}], "lr_scheduler": {"last_epoch": 8},
              "config": {"Global": {"output_dir": "out", "image_shape": [3, 32, 32]}},
              "rng": ("MT19937", np.arange(624, dtype=np.uint32), 5, 0, 0.0),
              "zero_d": np.array(3, dtype=np.int64), "int64": np.arange(6, dtype=np.int64).reshape(2, 3).T,
              "float32": np.linspace(0, 1, 5, dtype=np.float32), "f32_scalar": np.float32(0.25),
              "i64_scalar": np.int64(9), "tensor_in_list": [paddle.full([2], 0.5)]}
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    return model.state_dict(), opt.state_dict(), states, ema


def plain(tree):
    """Tensors -> ("Tensor", ndarray), so two loaded trees compare with assert_same."""
    if isinstance(tree, paddle.Tensor):
        return ("Tensor", tree.numpy())
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(plain(v) for v in tree)
    return tree


def assert_same(a, b, where="root"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def written(tmp_path):
    """``save_checkpoint`` files and, beside them, what ``paddle.save`` writes for the same parts."""
    model, opt, states, ema = checkpoint_parts()
    ours = save_checkpoint(tmp_path / "ours" / "latest", model, opt, states, ema)
    # save_checkpoint adds the size and CRC-32 of the files saved with the .pdstates
    states = {**states, FILES_KEY: safe_load(ours[-1])[FILES_KEY]}
    theirs = []
    for path, part in zip(ours, (model, opt, ema, states)):  # save_checkpoint's ORDER
        theirs.append(str(tmp_path / "paddle" / Path(path).name))
        paddle.save(part, theirs[-1])
    return ours, theirs, (model, opt, ema, states)


def test_files_name_only_globals_numpy_1_and_2_both_have(written):
    ours, theirs, _ = written
    assert [Path(p).suffix for p in ours] == [".pdparams", ".pdopt", ".pdema", ".pdstates"]
    for path in ours:
        refs = pickle_globals(Path(path).read_bytes())
        assert not [r for r in refs if r[0].startswith("numpy._core")], path
        assert refs <= PORTABLE_GLOBALS, f"{path}: {refs - PORTABLE_GLOBALS}"
        assert ("numpy.core.multiarray", "_reconstruct") in refs
    # The scanner sees what paddle.save itself writes under this numpy (numpy._core on numpy 2).
    numpy_module = np.arange(1).__reduce__()[0].__module__
    assert (numpy_module, "_reconstruct") in pickle_globals(Path(theirs[0]).read_bytes())


def test_paddle_load_and_safe_pickle_read_what_paddle_save_would_give(written):
    ours, theirs, originals = written
    for mine, ref, original in zip(ours, theirs, originals):
        assert_same(plain(paddle.load(mine)), plain(paddle.load(ref)), Path(mine).name)
        assert_same(safe_load(mine), safe_load(ref), Path(mine).name)
        assert_same(plain(paddle.load(mine)), plain(original), Path(mine).name)
    loaded = load_checkpoint(Path(ours[0]).with_suffix(""))
    assert loaded["states"]["rng"][1].dtype == np.uint32 and loaded["states"]["zero_d"].shape == ()
    assert_same(loaded["params"], {k: v.numpy() for k, v in originals[0].items()})


def test_paddle_load_keeps_tensor_names(written):
    ours, _, (model, *_) = written
    assert [t.name for t in paddle.load(ours[0]).values()] == [t.name for t in model.values()]


def test_numpy_2_loads_the_files_without_a_warning(written):
    """A fresh interpreter (nothing of numpy.core imported yet) with warnings turned into errors."""
    script = ("import pickle, sys, warnings\n"
              "warnings.simplefilter('error')\n"
              "for path in sys.argv[1:]:\n"
              "    pickle.load(open(path, 'rb'))\n"
              "try:\n"  # control: another numpy.core name does warn, so the filter is live
              "    pickle.loads(b'\\x80\\x04cnumpy.core.multiarray\\nzeros\\n.')\n"
              "    print('control silent')\n"
              "except DeprecationWarning:\n"
              "    print('control warned')\n")
    proc = subprocess.run([sys.executable, "-c", script, *written[0]], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    if np.__version__.startswith("2."):
        assert proc.stdout.strip() == "control warned"


def test_layer_objects_are_refused(tmp_path):
    with pytest.raises(TypeError, match="save its state_dict"):
        portable_save.save({"model": paddle.nn.Linear(2, 2)}, tmp_path / "x.pdstates")


def _probe(python, files, out):
    proc = subprocess.run([python, str(PROBE), str(out), *files], capture_output=True, text=True,
                          timeout=300)
    return proc


def _probe_result(out):
    with np.load(str(out) + ".npz") as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return json.loads(Path(str(out) + ".json").read_text()), arrays


@pytest.mark.skipif(not os.environ.get("PPCLS_FT_NUMPY1_PYTHON"),
                    reason="set PPCLS_FT_NUMPY1_PYTHON to a python with numpy 1.24.4 (as PaddleClas "
                           "pins), e.g. python3 -m venv /tmp/np1 && /tmp/np1/bin/pip install "
                           "numpy==1.24.4, to load the files under numpy 1")
def test_numpy_1_reads_the_same_values(written, tmp_path):
    numpy1 = os.environ["PPCLS_FT_NUMPY1_PYTHON"]
    ours, theirs, _ = written
    proc = _probe(numpy1, ours, tmp_path / "np1")
    assert proc.returncode == 0, proc.stderr
    proc = _probe(sys.executable, ours, tmp_path / "here")
    assert proc.returncode == 0, proc.stderr
    (meta1, arrays1), (meta2, arrays2) = _probe_result(tmp_path / "np1"), _probe_result(tmp_path / "here")
    assert meta1["numpy"].startswith("1."), f"{numpy1} has numpy {meta1['numpy']}, not 1.x"
    assert meta1["files"] == meta2["files"]  # same structure, types, python values, dtypes
    assert_same(arrays1, arrays2)
    if np.__version__.startswith("2."):  # control: what paddle.save writes here fails there
        proc = _probe(numpy1, theirs[:1], tmp_path / "paddle_np1")
        assert proc.returncode != 0 and "No module named 'numpy._core'" in proc.stderr


def test_a_real_training_checkpoint_names_no_numpy_2_module(tmp_path, tiny_dataset):
    """What the trainer writes (train state, EMA, Mixup/Cutmix generator state, config) is as
    portable as the hand-made parts above; under numpy 1 when PPCLS_FT_NUMPY1_PYTHON is set."""
    from ppcls_ft.engine.run import train
    from test_trainer import make_cfg
    train(make_cfg(tmp_path, tiny_dataset, name="run", epochs=1, overrides=[
        "EMA={decay: 0.9}", "Optimizer.lr.warmup_epoch=0",
        "DataLoader.Train.dataset.batch_transform_ops=[{OpSampler: {MixupOperator: "
        "{alpha: 0.8, prob: 0.5}, CutmixOperator: {alpha: 1.0, prob: 0.5}}}]"]))
    files = sorted(str(p) for p in (tmp_path / "run").glob("latest.*"))
    assert [Path(p).suffix for p in files] == [".pdema", ".pdopt", ".pdparams", ".pdstates"]
    for path in files:
        refs = pickle_globals(Path(path).read_bytes())
        assert refs <= PORTABLE_GLOBALS, f"{path}: {refs - PORTABLE_GLOBALS}"
    numpy1 = os.environ.get("PPCLS_FT_NUMPY1_PYTHON")
    if not numpy1:
        pytest.skip("PPCLS_FT_NUMPY1_PYTHON not set: the numpy-1 load was not run")
    proc = _probe(numpy1, files, tmp_path / "np1")
    assert proc.returncode == 0, proc.stderr
    meta, _ = _probe_result(tmp_path / "np1")
    assert meta["numpy"].startswith("1.")
