"""Data parallel over 2 CPU processes (gloo), as on GPUs: ``paddle.distributed.launch``.

One 2-process run of tools/train.py (batch 2 per device, update_freq 2, freeze-then-unfreeze,
layer decay) is compared with a 1-process run at batch 4: the same per-iteration losses, the
same final weights, and an eval that counts each of the 13 val images once. Further scenarios
(per-rank random streams, NaN / empty batch on one rank, linear probe, no_sync) run in
tests/multiproc/harness.py inside one more launch; resume runs as two "nodes" on 127.0.0.1.
"""
import json
import shutil
import socket

import numpy as np
import pytest

from ppcls_ft.config import load_config
from ppcls_ft.engine.checkpoint import load_checkpoint
from ppcls_ft.engine.run import evaluate_config
from ppcls_ft.selfcheck import (REPO, check_exact, config, finish, launch, loss_curve as _curve,
                                make_data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The exactness check of tools/check_gpu.py, on 2 CPU processes."""
    base = tmp_path_factory.mktemp("dp")
    ok, figures = check_exact(base, "cpu", 2)
    assert ok, figures
    return {"base": base, "data": make_data(base / "data"), "one": base / "exact_1proc",
            "two": base / "exact_2proc", "figures": figures}


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
    # per-class results of the 2-process run (its best epoch) equal a 1-process eval of best_model
    per_class = json.loads((two / "eval_results.json").read_text())
    cfg = load_config(config(tmp_path / "ev_best", *runs["data"], batch=4),
                      [f"Global.pretrained_model={two / 'best_model'}"])
    single = evaluate_config(cfg)
    assert per_class["images"] == 13 and np.sum(per_class["confusion_matrix"]) == 13
    assert per_class["confusion_matrix"] == single["confusion_matrix"]


def test_only_rank_zero_writes_and_the_start_line_states_the_batch(runs):
    two = runs["two"]
    log = (two / "train.log").read_text()
    assert ("world size 2 (this is rank 0): batch 2 per device, 4 global per iteration, "
            "8 per optimizer step (Global.update_freq 2)") in log
    assert "this is rank 1" not in log
    # each process took its share of the cores for math, not all of them
    assert "(2 training processes on this machine share them)" in log
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
        broken = f"broken_{i}.jpg"
        (root / broken).write_bytes(b"not an image")
        lines[i] = f"{broken} {lines[i].split()[1]}"
    bad.write_text("\n".join(lines) + "\n")
    same = root / "same_list.txt"
    same.write_text((train_list.read_text().splitlines()[0] + "\n") * 16)
    out = base / "harness"
    out.mkdir()
    rc, log = launch([REPO / "tests" / "multiproc" / "harness.py", out, root, train_list, val_list,
                      bad, same], base / "logh")
    assert rc == 0, log
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
            for name in ("streams", "nan", "empty", "probe", "nosync", "bn", "sigterm")}, out


def test_each_rank_draws_its_own_random_streams_reproducibly(harness):
    results, _ = harness
    for rank in results["streams"]:
        r0, r1 = rank["ranks"]
        assert rank["again_equal"]  # re-seeding (seed, rank, epoch) replays the same draws
        # both ranks load the same picture at every position: only their seeds differ
        assert r0[0] != r1[0] and r0[2] != r1[2]  # random crops and flips, the Mixup lambda
        assert r0[3:] != r1[3:]  # dropout masks


def test_nan_on_one_rank_stops_every_rank_with_the_message(harness):
    results, _ = harness
    for rank in results["nan"]:
        assert rank["diverged_at"] and "on rank 1" in rank["diverged_at"], rank
        assert "epoch 1, iteration 4" in rank["diverged_at"] and rank["epochs"] == 0


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
    for rank in results["empty"]:
        assert rank["ranks"][0] == rank["ranks"][1]  # both ranks hold the same weights
        assert rank["steps"] == 2  # the skipped boundary still stepped (with iteration 1's grads)
    log = (out / "empty" / "train.log").read_text()
    assert "rank 1 had no readable image in its batch; every rank skips this batch" in log


def test_linear_probe_under_data_parallel(harness):
    results, _ = harness
    for rank in results["probe"]:
        assert rank["changed"] and all(k.startswith("fc.") for k in rank["changed"])
        assert rank["ranks"][0] == rank["ranks"][1]


def test_batch_norm_running_statistics_are_averaged_over_ranks(harness):
    results, _ = harness
    res = results["bn"][0]
    before, after = np.array(res["before"]), np.array(res["after"])
    assert not np.allclose(before[0], before[1])  # each rank saw its own images
    np.testing.assert_allclose(after[0], before.mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(after[0], after[1])


def test_micro_steps_skip_the_gradient_all_reduce(harness):
    results, _ = harness
    res = results["nosync"][0]
    assert res["micro"][0] != res["micro"][1]  # local gradients: no all-reduce on a micro-step
    assert res["after_step"][0] == res["after_step"][1] and res["steps"] == 1


def test_a_lost_worker_ends_the_job_and_the_same_command_resumes_it(runs):
    """Rank 1 dies as epoch 2 starts: the job ends (no hang); the same command again, with
    Global.auto_resume, continues from latest and ends where the uninterrupted run ended."""
    base = runs["base"]
    out = base / "lost"
    cfg = config(out, *runs["data"], batch=2, Global={"auto_resume": True})
    marker = base / "lost.crashed"
    script = [REPO / "tests" / "multiproc" / "crash_once.py", marker, "-c", cfg]
    rc, log = launch(script, base / "lost_log1", timeout=180)
    assert rc != 0 and marker.is_file(), log
    assert load_checkpoint(out / "latest")["states"]["train_state"]["epoch"] == 1
    rc, log = launch(script, base / "lost_log2", timeout=180)
    assert rc == 0, log
    assert f"resumed from {out / 'latest'}" in (out / "train.log").read_text()
    a, b = load_checkpoint(runs["two"] / "latest"), load_checkpoint(out / "latest")
    for key, value in a["params"].items():
        np.testing.assert_allclose(b["params"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
