"""lr schedules: exact values at given steps (COMPAT section 5), validation, resume round trip."""
import logging
import math

import pytest

from ppcls_ft.errors import ConfigError
from ppcls_ft.optim.lr_scheduler import LR_TAG, build_lr_scheduler, lr_at
from ppcls_ft.registry import LR_SCHEDULERS


def run(sched, n):
    """lr used by optimizer steps 0..n-1 (the scheduler is stepped after each optimizer step)."""
    out = []
    for _ in range(n):
        out.append(lr_at(sched))
        sched.step()
    return out


def test_cosine_nine_value_check_from_compat_guide():
    cfg = {"name": "Cosine", "learning_rate": 0.1, "eta_min": 0.001, "warmup_epoch": 1,
           "warmup_start_lr": 0.01}
    sched = build_lr_scheduler(cfg, epochs=4, steps_per_epoch=2)
    expected = [0.01, 0.055, 0.1, 0.09337, 0.07525, 0.0505, 0.02575, 0.00763, 0.001]
    assert run(sched, 9) == pytest.approx(expected, abs=5e-6)


def test_cosine_formula_without_warmup_and_clamped_after_end():
    sched = build_lr_scheduler({"name": "Cosine", "learning_rate": 0.2}, epochs=3, steps_per_epoch=5)
    got = run(sched, 18)
    want = [0.2 * (1 + math.cos(math.pi * min(t, 15) / 15)) / 2 for t in range(18)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_fractional_warmup_rounds_to_whole_steps():
    sched = build_lr_scheduler({"name": "ConstLR", "learning_rate": 0.3, "warmup_epoch": 0.5},
                               epochs=2, steps_per_epoch=5)  # W = round(2.5) = 2
    assert sched.warmup_steps == round(0.5 * 5)
    assert run(sched, 4) == pytest.approx([0.0, 0.15, 0.3, 0.3])


def test_piecewise_follows_values_with_warmup_on_post_warmup_clock(caplog):
    cfg = {"name": "Piecewise", "learning_rate": 0.1, "decay_epochs": [1, 2], "values": [0.4, 0.2, 0.1],
           "warmup_epoch": 1, "warmup_start_lr": 0.0}
    with caplog.at_level(logging.WARNING, logger="ppcls_ft"):
        sched = build_lr_scheduler(cfg, epochs=5, steps_per_epoch=2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Piecewise" in r.getMessage()]
    assert len(warnings) == 1
    # warmup 2 steps to values[0]=0.4, then boundaries at t'=2 and t'=4
    assert run(sched, 9) == pytest.approx([0.0, 0.2, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.1])


def test_piecewise_resnet50_config_is_not_replaced_by_paddleclas_default():
    cfg = {"name": "Piecewise", "learning_rate": 0.1, "decay_epochs": [30, 60, 90],
           "values": [0.1, 0.01, 0.001, 0.0001]}
    sched = build_lr_scheduler(cfg, epochs=120, steps_per_epoch=10)
    for t, want in [(0, 0.1), (299, 0.1), (300, 0.01), (599, 0.01), (600, 0.001), (900, 0.0001)]:
        assert lr_at(sched, t) == pytest.approx(want)


def test_step_and_multistep_milestones_are_epochs():
    step = build_lr_scheduler({"name": "Step", "learning_rate": 1.0, "step_size": 2, "gamma": 0.5},
                              epochs=10, steps_per_epoch=3)
    assert run(step, 13) == pytest.approx([0.5 ** (t // 6) for t in range(13)])
    ms = build_lr_scheduler({"name": "MultiStepDecay", "learning_rate": 1.0, "milestones": [1, 3],
                             "gamma": 0.1, "warmup_epoch": 1}, epochs=6, steps_per_epoch=2)
    # warmup t=0,1 from 0; then t'=0.. with drops at t'=2 and t'=6
    want = [0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]
    assert run(ms, 10) == pytest.approx(want)


@pytest.mark.parametrize("power,cycle", [(1.0, False), (2.0, False), (1.0, True)])
def test_linear_is_polynomial_decay(power, cycle):
    lr0, end, d = 0.5, 0.1, 4  # D = 2 epochs * 2 steps
    sched = build_lr_scheduler({"name": "Linear", "learning_rate": lr0, "end_lr": end, "power": power,
                                "cycle": cycle}, epochs=2, steps_per_epoch=2)
    want = []
    for t in range(10):
        if cycle:
            dd = d * max(math.ceil(t / d), 1)
            want.append((lr0 - end) * (1 - t / dd) ** power + end)
        else:
            want.append((lr0 - end) * (1 - min(t, d) / d) ** power + end)
    assert run(sched, 10) == pytest.approx(want)


@pytest.mark.parametrize("cfg", [
    {"name": "Cosine", "learning_rate": 0.1, "eta_min": 0.01, "warmup_epoch": 2, "warmup_start_lr": 0.001},
    {"name": "Piecewise", "decay_epochs": [2, 4], "values": [0.1, 0.05, 0.01], "warmup_epoch": 1},
    {"name": "Linear", "learning_rate": 0.1, "power": 2.0, "warmup_epoch": 1},
    {"name": "Step", "learning_rate": 0.1, "step_size": 1},
])
def test_state_dict_round_trip_resumes_exactly(cfg):
    a = build_lr_scheduler(cfg, epochs=6, steps_per_epoch=3)
    run(a, 5)
    state = a.state_dict()
    b = build_lr_scheduler(cfg, epochs=6, steps_per_epoch=3)
    b.set_state_dict(state)
    assert lr_at(b) == lr_at(a)
    assert run(b, 8) == run(a, 8)


def test_every_registered_schedule_has_name_and_builds():
    assert LR_TAG == "lr"
    minimal = {"Cosine": {"learning_rate": 0.1}, "ConstLR": {"learning_rate": 0.1},
               "Linear": {"learning_rate": 0.1}, "Step": {"learning_rate": 0.1, "step_size": 1},
               "MultiStepDecay": {"learning_rate": 0.1, "milestones": [1]},
               "Piecewise": {"decay_epochs": [1], "values": [0.1, 0.01]}}
    assert sorted(minimal) == LR_SCHEDULERS.names()
    for name, kw in minimal.items():
        sched = build_lr_scheduler({"name": name, **kw}, epochs=3, steps_per_epoch=2)
        assert sched.name == name
        assert lr_at(sched) == pytest.approx(0.1)


@pytest.mark.parametrize("cfg,key", [
    ({"name": "Piecewise", "decay_epochs": [30, 60], "values": [0.1, 0.01]}, "Optimizer.lr.values"),
    ({"name": "Cosine", "learning_rate": 0.1, "warmup_epoch": 4}, "Optimizer.lr.warmup_epoch"),
    ({"name": "Cosine", "learning_rate": 0.1, "eta_mni": 0.0}, "Optimizer.lr.eta_mni"),
    ({"name": "Step", "learning_rate": 0.1, "step_size": 0}, "Optimizer.lr.step_size"),
    ({"name": "MultiStepDecay", "learning_rate": 0.1, "milestones": [3, 1]}, "Optimizer.lr.milestones"),
    ({"name": "Cosine", "learning_rate": 0.1, "epochs": 3}, "Optimizer.lr.epochs"),
])
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError) as info:
        build_lr_scheduler(cfg, epochs=4, steps_per_epoch=2)
    assert info.value.path == key
    assert str(info.value).startswith(key + ":")


def test_unknown_schedule_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'Cosine'"):
        build_lr_scheduler({"name": "Cosin", "learning_rate": 0.1}, epochs=2, steps_per_epoch=2)


def test_by_epoch_holds_the_lr_for_a_whole_epoch():
    cfg = {"name": "Cosine", "learning_rate": 0.1, "eta_min": 0.001, "warmup_epoch": 1,
           "warmup_start_lr": 0.01, "by_epoch": True}
    sched = build_lr_scheduler(cfg, epochs=4, steps_per_epoch=2)
    # the nine-value check at each epoch's first step (t = 0, 2, 4, 6), held for both steps
    expected = [0.01, 0.01, 0.1, 0.1, 0.07525, 0.07525, 0.02575, 0.02575]
    assert run(sched, 8) == pytest.approx(expected, abs=5e-6)
