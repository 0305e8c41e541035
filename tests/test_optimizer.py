"""Optimizers: decay exemptions, layer-wise lr multipliers, clipping, frozen params, configs, resume."""
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import pytest
import yaml

from ppcls_ft.errors import ConfigError
from ppcls_ft.models.base import ClassifierBase
from ppcls_ft.optim.lr_scheduler import build_lr_scheduler
from ppcls_ft.optim.optimizer import build_optimizer


class Tiny(ClassifierBase):
    """stem (layer 0) -> norm (layer 0) -> block (layer 1) -> fc (layer 2, head)."""

    classifier_prefixes = ("fc.",)
    num_layer_ids = 3

    def __init__(self, class_num=3, bn_no_decay_attr=False):
        super().__init__()
        self.class_num = class_num
        self.stem = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        attr = paddle.ParamAttr(regularizer=paddle.regularizer.L2Decay(0.0)) if bn_no_decay_attr else None
        self.block = nn.Linear(6, 6, weight_attr=attr)
        self.fc = nn.Linear(6, class_num)

    def forward_features(self, x):
        return nn.functional.relu(self.block(self.norm(self.stem(x))))

    def forward_head(self, x):
        return self.fc(x)

    def layer_id(self, name):
        return 2 if name.startswith("fc.") else 1 if name.startswith("block.") else 0


def snapshot(model):
    return {n: p.numpy().copy() for n, p in model.named_parameters()}


def step_once(model, opt, scale=1.0, seed=0):
    """One forward/backward/step; scale=0 gives exactly-zero gradients. Returns the grads."""
    x = paddle.to_tensor(np.random.default_rng(seed).normal(size=(5, 4)).astype("float32"))
    loss = (model(x) ** 2).mean() * scale
    loss.backward()
    grads = {n: (p.grad.numpy().copy() if p.grad is not None else None) for n, p in model.named_parameters()}
    opt.step()
    opt.clear_grad()
    return grads


@pytest.mark.parametrize("name", ["Momentum", "SGD", "RMSProp"])
def test_coupled_decay_exempts_names_and_one_dim(name):
    model = Tiny()
    before = snapshot(model)
    cfg = {"name": name, "regularizer": {"name": "L2", "coeff": 0.1},
           "no_weight_decay_name": "norm", "one_dim_param_no_weight_decay": True}
    opt = build_optimizer(cfg, model, 0.5)
    step_once(model, opt, scale=0.0)  # zero gradients: only decay moves parameters
    after = snapshot(model)
    for n in before:
        exempt = n.startswith("norm.") or before[n].ndim == 1
        if exempt:
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)
        elif name == "RMSProp":  # g = c*p; mean_square = (1-rho) g^2; delta = lr g / sqrt(ms + eps)
            g = 0.1 * before[n]
            want = before[n] - 0.5 * g / np.sqrt(0.05 * g * g + 1e-6)
            np.testing.assert_allclose(after[n], want, rtol=1e-4, err_msg=n)
        else:  # SGD and the first Momentum step: p - lr * c * p
            np.testing.assert_allclose(after[n], before[n] * (1 - 0.5 * 0.1), rtol=1e-6, err_msg=n)


def test_l1_regularizer_with_momentum():
    model = Tiny()
    before = snapshot(model)
    cfg = {"name": "Momentum", "regularizer": {"name": "L1", "coeff": 0.1},
           "one_dim_param_no_weight_decay": True}
    opt = build_optimizer(cfg, model, 0.5)
    step_once(model, opt, scale=0.0)  # L1 adds coeff * sign(p) to the (zero) gradient
    for n, v in snapshot(model).items():
        want = before[n] if before[n].ndim == 1 else before[n] - 0.5 * 0.1 * np.sign(before[n])
        np.testing.assert_allclose(v, want, rtol=1e-6, err_msg=n)


def test_adamw_decoupled_decay_respects_exemptions():
    model = Tiny()
    before = snapshot(model)
    cfg = {"name": "AdamW", "weight_decay": 0.2, "no_weight_decay_name": "block.weight",
           "one_dim_param_no_weight_decay": True}
    opt = build_optimizer(cfg, model, 0.1)
    step_once(model, opt, scale=0.0)  # zero grads: Adam's update is 0/(0+eps) = 0
    after = snapshot(model)
    decayed = {"stem.weight", "fc.weight"}
    for n in before:
        want = before[n] * (1 - 0.1 * 0.2) if n in decayed else before[n]
        np.testing.assert_allclose(after[n], want, rtol=1e-6, err_msg=n)


def test_model_declared_regularizer_wins_over_optimizer_decay():
    model = Tiny(bn_no_decay_attr=True)  # block.weight carries ParamAttr L2Decay(0.0), like PPLCNet BN
    before = snapshot(model)
    opt = build_optimizer({"name": "Momentum", "regularizer": {"name": "L2", "coeff": 0.1}}, model, 1.0)
    step_once(model, opt, scale=0.0)
    after = snapshot(model)
    np.testing.assert_array_equal(after["block.weight"], before["block.weight"])
    np.testing.assert_allclose(after["stem.weight"], before["stem.weight"] * 0.9, rtol=1e-6)


def test_layer_decay_scales_sgd_steps_and_combines_with_lr_mult():
    model = Tiny()
    model.stem.weight.optimize_attr["learning_rate"] = 2.0  # as PaddleClas lr_mult_list would set
    lr, decay = 0.1, 0.5
    for _ in range(2):  # rebuilding must not compound the multipliers
        opt = build_optimizer({"name": "SGD"}, model, lr, layer_decay=decay)
    before = snapshot(model)
    grads = step_once(model, opt)
    after = snapshot(model)
    for n in before:
        mult = decay ** (model.num_layer_ids - 1 - model.layer_id(n))
        if n == "stem.weight":
            mult *= 2.0
        np.testing.assert_allclose(before[n] - after[n], lr * mult * grads[n], rtol=1e-4, atol=1e-6,
                                   err_msg=n)
    # head moves 1/0.25 = 4x more than the stem bias for the same gradient
    assert model.fc.weight.optimize_attr["learning_rate"] == 1.0
    assert model.stem.bias.optimize_attr["learning_rate"] == pytest.approx(0.25)


def test_layer_decay_is_validated():
    with pytest.raises(ConfigError, match="Optimizer.layer_decay"):
        build_optimizer({"name": "SGD"}, Tiny(), 0.1, layer_decay=1.5)


@pytest.mark.parametrize("key", ["clip_norm", "clip_norm_global"])
def test_clip_norm_caps_the_global_gradient_norm(key):
    model = Tiny()
    opt = build_optimizer({"name": "SGD", key: 0.01}, model, 1.0)
    before = snapshot(model)
    grads = step_once(model, opt, scale=100.0)
    raw = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    assert raw > 0.01  # clipping is active
    after = snapshot(model)
    moved = np.sqrt(sum(((before[n] - after[n]).astype(np.float64) ** 2).sum() for n in before))
    assert moved == pytest.approx(0.01, rel=1e-4)


def test_frozen_params_are_kept_and_train_after_unfreeze():
    model = Tiny()
    model.stem.weight.stop_gradient = True
    opt = build_optimizer({"name": "Momentum", "momentum": 0.9}, model, 0.1)
    before = snapshot(model)
    step_once(model, opt)
    mid = snapshot(model)
    np.testing.assert_array_equal(mid["stem.weight"], before["stem.weight"])
    assert not np.array_equal(mid["fc.weight"], before["fc.weight"])
    model.stem.weight.stop_gradient = False
    step_once(model, opt, seed=1)
    assert not np.array_equal(snapshot(model)["stem.weight"], mid["stem.weight"])


def test_unknown_optimizer_and_key_give_close_matches():
    with pytest.raises(ConfigError, match="did you mean 'Momentum'"):
        build_optimizer({"name": "Momentun"}, Tiny(), 0.1)
    with pytest.raises(ConfigError, match=r"Optimizer\.momentun.*did you mean 'momentum'"):
        build_optimizer({"name": "Momentum", "momentun": 0.9}, Tiny(), 0.1)
    with pytest.raises(ConfigError, match=r"Optimizer\.regularizer\.name"):
        build_optimizer({"name": "Momentum", "regularizer": {"name": "L3", "coeff": 1.0}}, Tiny(), 0.1)
    with pytest.raises(ConfigError, match=r"Optimizer\.clip_norm"):
        build_optimizer({"name": "AdamW", "clip_norm": 0.0}, Tiny(), 0.1)
    with pytest.raises(ConfigError, match=r"Optimizer\.clip_norm_global"):
        build_optimizer({"name": "AdamW", "clip_norm": 1.0, "clip_norm_global": 1.0}, Tiny(), 0.1)
    with pytest.raises(ConfigError, match=r"Optimizer: set either regularizer"):
        build_optimizer({"name": "SGD", "weight_decay": 1e-4, "regularizer": {"name": "L2", "coeff": 1e-4}},
                        Tiny(), 0.1)


def _numbers(node):
    """YAML 1.1 leaves '1e-3' as a string; convert like the config loader does."""
    if isinstance(node, dict):
        return {k: _numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    if isinstance(node, str):
        try:
            return float(node)
        except ValueError:
            return node
    return node


def test_every_shared_paddleclas_optimizer_section_builds(shared):
    files = sorted((Path(shared) / "paddleclas_configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = _numbers(yaml.safe_load(f.read_text()))
        section = cfg["Optimizer"]
        sched = build_lr_scheduler(section["lr"], epochs=cfg["Global"]["epochs"], steps_per_epoch=3)
        model = Tiny()
        opt = build_optimizer(section, model, sched)
        assert type(opt).__name__ == section["name"], f.name
        step_once(model, opt)  # and it actually steps


def test_optimizer_state_dict_round_trip():
    cfg = {"name": "AdamW", "weight_decay": 0.05, "one_dim_param_no_weight_decay": True}
    lr = {"name": "Cosine", "learning_rate": 0.01}
    # each run under a fresh unique-name scope: a resumed process sees the same param/accumulator names
    with paddle.utils.unique_name.guard():
        a = Tiny()
        sched_a = build_lr_scheduler(lr, epochs=2, steps_per_epoch=4)
        opt_a = build_optimizer(cfg, a, sched_a)
        for s in range(3):
            step_once(a, opt_a, seed=s)
            sched_a.step()
    model_state, opt_state = a.state_dict(), opt_a.state_dict()
    with paddle.utils.unique_name.guard():
        b = Tiny()
        sched_b = build_lr_scheduler(lr, epochs=2, steps_per_epoch=4)
        opt_b = build_optimizer(cfg, b, sched_b)
        b.set_state_dict(model_state)
        opt_b.set_state_dict(opt_state)
        assert sched_b() == sched_a()
        step_once(b, opt_b, seed=9)
    step_once(a, opt_a, seed=9)
    for n, v in snapshot(a).items():
        np.testing.assert_array_equal(snapshot(b)[n], v, err_msg=n)


# ---------------------------------------------------------------------------------- EMA
class TinyBN(nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1D(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_ema_update_formula_and_buffer_copy():
    from ppcls_ft.optim.ema import ModelEMA

    model = TinyBN()
    w0 = model.fc.weight.numpy().copy()
    ema = ModelEMA(model, decay=0.75)
    assert set(ema.state_dict()) == set(model.state_dict())  # params AND buffers (bn._mean ...)
    paddle.assign(paddle.to_tensor(w0 + 1.0), model.fc.weight)
    paddle.assign(paddle.full([4], 3.0), model.bn._mean)
    ema.update(model)
    np.testing.assert_allclose(ema.state_dict()["fc.weight"].numpy(), 0.75 * w0 + 0.25 * (w0 + 1.0),
                               rtol=1e-6)
    np.testing.assert_array_equal(ema.state_dict()["bn._mean"].numpy(), np.full(4, 3.0, "float32"))
    paddle.assign(paddle.to_tensor(w0 + 3.0), model.fc.weight)
    ema.update(model)  # second step folds into the previous average
    np.testing.assert_allclose(ema.state_dict()["fc.weight"].numpy(),
                               0.75 * (0.75 * w0 + 0.25 * (w0 + 1.0)) + 0.25 * (w0 + 3.0), rtol=1e-6)


def test_ema_apply_to_restores_and_state_dict_round_trip():
    from ppcls_ft.optim.ema import ModelEMA

    model = TinyBN()
    ema = ModelEMA(model, decay=0.5)
    live = model.fc.weight.numpy().copy()
    paddle.assign(paddle.to_tensor(live * 3.0), model.fc.weight)
    ema.update(model)  # shadow = 0.5 w + 0.5 * 3w = 2w
    live3 = model.fc.weight.numpy().copy()
    with ema.apply_to(model):
        np.testing.assert_allclose(model.fc.weight.numpy(), 2.0 * live, rtol=1e-6)
    np.testing.assert_array_equal(model.fc.weight.numpy(), live3)
    other = ModelEMA(TinyBN(), decay=0.5)
    other.set_state_dict({k: v.numpy() for k, v in ema.state_dict().items()})
    for k, v in ema.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    with pytest.raises(KeyError):
        other.set_state_dict({"fc.weight": live})


def test_batchnorm_running_stats_are_left_out_of_the_optimizer():
    model = TinyBN()  # Paddle stores bn._mean/_variance as (non-trainable) parameters
    opt = build_optimizer({"name": "Momentum", "regularizer": {"name": "L2", "coeff": 0.1}}, model, 0.1)
    handed = {p.name for group in opt._param_groups for p in group["params"]}
    assert handed == {model.fc.weight.name, model.fc.bias.name, model.bn.weight.name, model.bn.bias.name}


def test_ema_decay_is_validated():
    from ppcls_ft.optim.ema import ModelEMA

    with pytest.raises(ConfigError, match=r"^EMA\.decay"):
        ModelEMA(TinyBN(), decay=1.0)
