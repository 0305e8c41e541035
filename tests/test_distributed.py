"""Data parallel over 2 CPU processes (gloo), as on GPUs: ``paddle.distributed.launch``.

One 2-process run of tools/train.py (batch 2 per device, update_freq 2, freeze-then-unfreeze,
layer decay) is compared with a 1-process run at batch 4: the same per-iteration losses, the
same final weights, and an eval that counts each of the 13 val images once. Further scenarios
(per-rank random streams, NaN / empty batch on one rank, linear probe, no_sync) run in
tests/multiproc/harness.py inside one more launch; resume runs as two "nodes" on 127.0.0.1.
"""
import json
import re
import shutil
import socket

import numpy as np
import pytest

from ppcls_ft.config import load_config
from ppcls_ft.engine.checkpoint import load_checkpoint
from ppcls_ft.engine.run import evaluate_config, train
from multiproc.common import REPO, config, finish, launch, make_data

LOSS = re.compile(r"\[Train\]\[Epoch (\d+)/\d+\]\[Iter: (\d+)/\d+\]lr: ([0-9.]+), CELoss: ([0-9.]+)")


def _curve(out_dir):
    return [tuple(map(float, m.groups())) for m in LOSS.finditer((out_dir / "train.log").read_text())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp")
    data = make_data(base / "data")
    two = base / "two"
    rc, out = launch(["tools/train.py", "-c", config(two, *data, batch=2)], base / "log2")
    assert rc == 0, out
    one = base / "one"
    train(load_config(config(one, *data, batch=4)))
    return {"base": base, "data": data, "one": one, "two": two, "log": out}


def test_two_processes_reproduce_one_process_with_twice_the_batch(runs):
    one, two = runs["one"], runs["two"]
    c1, c2 = _curve(one), _curve(two)
    assert len(c1) == len(c2) == 8  # 2 epochs x 4 iterations
    np.testing.assert_allclose(np.array(c2), np.array(c1), rtol=1e-5, atol=1e-6)
    a, b = load_checkpoint(one / "latest"), load_checkpoint(two / "latest")
    a1, b1 = load_checkpoint(one / "epoch_1")["params"], load_checkpoint(two / "epoch_1")["params"]
    for key, value in a["params"].items():
        np.testing.assert_allclose(b["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        # what epoch 2 changed, compared on its own scale (weights dwarf one epoch's update)
        da, db = value - a1[key], b["params"][key] - b1[key]
        np.testing.assert_allclose(db, da, rtol=1e-3, atol=1e-3 * np.abs(da).max() + 1e-9, err_msg=key)
    assert a["states"]["train_state"]["global_step"] == b["states"]["train_state"]["global_step"] == 4
    # the backbone, unfrozen in epoch 2, trained under a re-wrapped DataParallel
    moved = np.abs(b["params"]["conv1.conv.weight"] - b1["conv1.conv.weight"]).max()
    assert moved > 1e-6, moved  # exactly 0 if its gradients were never reduced and applied


def test_two_process_eval_counts_every_image_once(runs, tmp_path):
    two = runs["two"]
    rec = json.loads((two / "train_results.json").read_text())["epochs"]
    assert [r["eval_images"] for r in rec] == [13, 13]
    # the same weights evaluated in one process give the same numbers
    cfg = load_config(config(tmp_path / "ev", *runs["data"], batch=4),
                      [f"Global.pretrained_model={two / 'epoch_2'}"])
    single = evaluate_config(cfg)
    assert single["top1"] == pytest.approx(rec[1]["eval_top1"], abs=1e-12)
    assert single["loss"] == pytest.approx(rec[1]["eval_loss"], rel=1e-6)
    one = json.loads((runs["one"] / "train_results.json").read_text())["epochs"]
    assert [r["eval_top1"] for r in one] == pytest.approx([r["eval_top1"] for r in rec])


def test_only_rank_zero_writes_and_the_start_line_states_the_batch(runs):
    two = runs["two"]
    log = (two / "train.log").read_text()
    assert ("world size 2 (this is rank 0): batch 2 per device, 4 global per iteration, "
            "8 per optimizer step (Global.update_freq 2)") in log
    assert "this is rank 1" not in log
    assert len(list((two / "vdl").glob("vdlrecords.*"))) == 1
    assert sorted(p.name for p in two.glob("*.pdstates")) == [
        "best_model.pdstates", "epoch_1.pdstates", "epoch_2.pdstates", "latest.pdstates"]
    assert not list(two.glob("*.tmp*"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_resume_from_latest_with_auto_resume(runs):
    """Two launchers on 127.0.0.1 form a 2-node job; each resumes from the copied epoch_1 as
    ``latest`` through Global.auto_resume and ends where the uninterrupted run ended."""
    base, two = runs["base"], runs["two"]
    again = base / "again"
    again.mkdir()
    for f in two.glob("epoch_1.*"):
        shutil.copy(f, again / f.name.replace("epoch_1", "latest"))
    cfg = config(again, *runs["data"], batch=2, Global={"auto_resume": True})
    master = f"127.0.0.1:{_free_port()}"
    procs = [launch(["tools/train.py", "-c", cfg], base / f"node{i}", nproc=1, wait=False,
                    extra_launch=["--master", master, "--nnodes", "2", "--rank", str(i)])
             for i in range(2)]
    results = [finish(p, base / f"node{i}") for i, p in enumerate(procs)]
    for rc, out in results:
        assert rc == 0, out
    log = (again / "train.log").read_text()
    assert f"resumed from {again / 'latest'}" in log and "world size 2" in log
    a, b = load_checkpoint(two / "latest"), load_checkpoint(again / "latest")
    assert b["states"]["train_state"]["epoch"] == 2
    for key, value in a["params"].items():
        np.testing.assert_allclose(b["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def harness(runs):
    base = runs["base"]
    root, train_list, val_list = runs["data"]
    lines = train_list.read_text().splitlines()
    # unshuffled, rank 1's second batch (iteration 2, an accumulation boundary) is images 6, 7
    bad = root / "bad_list.txt"
    for i in (6, 7):
        rel = lines[i].split()[0]
        broken = f"broken_{i}.jpg"
        (root / broken).write_bytes(b"not an image")
        lines[i] = f"{broken} {lines[i].split()[1]}"
    bad.write_text("\n".join(lines) + "\n")
    out = base / "harness"
    out.mkdir()
    rc, log = launch([REPO / "tests" / "multiproc" / "harness.py", out, root, train_list, val_list,
                      bad], base / "logh")
    assert rc == 0, log
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
            for name in ("streams", "nan", "empty", "probe", "nosync", "sigterm")}, out


def test_each_rank_draws_its_own_random_streams_reproducibly(harness):
    results, _ = harness
    for rank in results["streams"]:
        r0, r1 = rank["ranks"]
        assert rank["again_equal"]  # re-seeding (seed, rank, epoch) replays the same draws
        assert r0[0] != r1[0] and r0[1] != r1[1] and r0[2] != r1[2]  # crops, Mixup, its lambda
        assert r0[3:] != r1[3:]  # dropout masks


def test_nan_on_one_rank_stops_every_rank_with_the_message(harness):
    results, _ = harness
    for rank in results["nan"]:
        assert rank["diverged_at"] and "on rank 1" in rank["diverged_at"], rank
        assert "epoch 1, iteration 3" in rank["diverged_at"] and rank["epochs"] == 0


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(harness):
    """Rank 1 alone receives SIGTERM during step 3: both ranks stop before step 4 (a rank that
    went on would wait forever in the gradient all-reduce), and rank 0 writes the results."""
    results, out = harness
    r0, r1 = results["sigterm"]
    assert r1["stopped_by"] == "SIGTERM" and r0["stopped_by"] == "a stop signal on another rank"
    # update_freq 2: iterations 1-2 are optimizer step 1, 3 a micro-step, 4 is never started
    assert r0["steps"] == r1["steps"] == 1 and r0["epochs"] == r1["epochs"] == 0
    assert json.loads((out / "sigterm" / "train_results.json").read_text())["stopped_by"] == r0["stopped_by"]


def test_an_unreadable_batch_on_one_rank_is_skipped_by_all(harness):
    results, out = harness
    r0, r1 = (r["ranks"] for r in results["empty"])
    assert r0 == r1 and r0[0] == r1[1]  # all ranks hold the same weights after the skip
    log = (out / "empty" / "train.log").read_text()
    assert "rank 1 had no readable image in its batch; every rank skips this batch" in log


def test_linear_probe_under_data_parallel(harness):
    results, _ = harness
    for rank in results["probe"]:
        assert rank["changed"] and all(k.startswith("fc.") for k in rank["changed"])
        assert rank["ranks"][0] == rank["ranks"][1]


def test_micro_steps_skip_the_gradient_all_reduce(harness):
    results, _ = harness
    res = results["nosync"][0]
    assert res["micro"][0] != res["micro"][1]  # local gradients: no all-reduce on a micro-step
    assert res["after_step"][0] == res["after_step"][1] and res["steps"] == 1
