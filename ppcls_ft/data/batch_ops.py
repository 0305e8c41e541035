"""Batch operators (Mixup, Cutmix, OpSampler) applied to a whole batch in the train step.

They run on paddle tensors in the main process, not in loader workers: one ``lam`` and one
permutation per batch (COMPAT §3), drawn from each operator's own ``numpy.random.Generator`` so a
run is reproducible (``op.seed(n)``) and resumable (``state_dict`` / ``set_state_dict``).
Call: ``images, targets = op(images, labels)``; targets are float32 ``[N, class_num]`` rows that
sum to 1, or the hard labels unchanged when ``OpSampler`` leaves the batch alone.
"""
from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from ..errors import ConfigError
from ..registry import BATCH_OPS, check_kwargs


def _as_tensor(x):
    return x if isinstance(x, paddle.Tensor) else paddle.to_tensor(x)


class _MixBase:
    """Shared: class_num/alpha checks, the generator, one-hot target mixing."""

    def __init__(self, class_num: int, alpha: float):
        if not isinstance(class_num, int) or class_num <= 0:
            raise ValueError(f"class_num must be a positive integer (Arch.class_num), "
                             f"got {class_num!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (lam ~ Beta(alpha, alpha)), got {alpha}")
        self.class_num = class_num
        self.alpha = float(alpha)
        self._rng = np.random.default_rng()
        self.last_lam = 1.0

    def seed(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state}

    def set_state_dict(self, state):
        self._rng.bit_generator.state = state["rng"]

    def _draw(self, n):
        return float(self._rng.beta(self.alpha, self.alpha)), self._rng.permutation(n)

    def _targets(self, labels, perm, lam):
        labels = _as_tensor(labels).reshape([-1]).astype("int64")
        onehot = F.one_hot(labels, self.class_num).astype("float32")
        return lam * onehot + (1.0 - lam) * paddle.gather(onehot, paddle.to_tensor(perm))


@BATCH_OPS.register
class MixupOperator(_MixBase):
    """``x = lam*x + (1-lam)*x[perm]``, ``lam ~ Beta(alpha, alpha)``.

    YAML: ``batch_transform_ops: [{MixupOperator: {alpha: 0.2}}]``; ``class_num`` comes from
    ``Arch.class_num``.
    """

    def __init__(self, class_num: int, alpha: float = 1.0):
        super().__init__(class_num, alpha)

    def __call__(self, images, labels):
        images = _as_tensor(images)
        lam, perm = self._draw(images.shape[0])
        self.last_lam = lam
        mixed = lam * images + (1.0 - lam) * paddle.gather(images, paddle.to_tensor(perm))
        return mixed, self._targets(labels, perm, lam)


@BATCH_OPS.register
class CutmixOperator(_MixBase):
    """Paste a box from ``x[perm]``; box side ratio ``sqrt(1-lam)``, random centre, clipped.

    YAML: ``batch_transform_ops: [{CutmixOperator: {alpha: 0.2}}]`` (0.2 is PaddleClas's
    default). After clipping, ``lam`` is recomputed as ``1 - box_area / image_area`` and the
    targets use that value.
    """

    def __init__(self, class_num: int, alpha: float = 0.2):
        super().__init__(class_num, alpha)
        self.last_box = (0, 0, 0, 0)

    def _box(self, h, w, lam):
        """(x1, y1, x2, y2) in pixels, clipped to the image."""
        ratio = np.sqrt(1.0 - lam)
        cut_w, cut_h = int(w * ratio), int(h * ratio)
        cx, cy = int(self._rng.integers(w)), int(self._rng.integers(h))
        x1, x2 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
        y1, y2 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
        return int(x1), int(y1), int(x2), int(y2)

    def __call__(self, images, labels):
        images = _as_tensor(images)
        n, _, h, w = images.shape
        lam, perm = self._draw(n)
        x1, y1, x2, y2 = self._box(h, w, lam)
        out = images.clone()
        if x2 > x1 and y2 > y1:
            shuffled = paddle.gather(images, paddle.to_tensor(perm))
            out[:, :, y1:y2, x1:x2] = shuffled[:, :, y1:y2, x1:x2]
        lam = 1.0 - (x2 - x1) * (y2 - y1) / float(h * w)
        self.last_lam, self.last_box = lam, (x1, y1, x2, y2)
        return out, self._targets(labels, perm, lam)


_SAMPLED = {"MixupOperator": MixupOperator, "CutmixOperator": CutmixOperator}


@BATCH_OPS.register
class OpSampler:
    """Pick one batch op per batch by probability; the remainder leaves the batch unchanged.

    YAML::

        batch_transform_ops:
          - OpSampler:
              MixupOperator: {alpha: 0.8, prob: 0.5}
              CutmixOperator: {alpha: 1.0, prob: 0.5}

    When no op is picked, ``op(images, labels)`` returns the hard labels as given and
    ``last_op`` is ``"none"``.
    """

    def __init__(self, class_num: int, MixupOperator: Optional[dict] = None,
                 CutmixOperator: Optional[dict] = None):
        self.ops, self.probs = [], []
        for name, cfg in (("MixupOperator", MixupOperator), ("CutmixOperator", CutmixOperator)):
            if cfg is None:
                continue
            cfg = dict(cfg)
            prob = cfg.pop("prob", None)
            if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0 <= prob <= 1:
                raise ConfigError(f"{name}.prob", f"set a probability in [0, 1], got {prob!r}")
            check_kwargs(_SAMPLED[name], cfg, name, skip=("class_num",))
            self.ops.append((name, _SAMPLED[name](class_num=class_num, **cfg)))
            self.probs.append(float(prob))
        if not self.ops:
            raise ConfigError("", "OpSampler needs MixupOperator and/or CutmixOperator "
                                  "entries, each with alpha and prob")
        if sum(self.probs) > 1.0 + 1e-6:
            raise ConfigError("", f"probabilities sum to {sum(self.probs):g} > 1; lower them")
        self.class_num = class_num
        self._rng = np.random.default_rng()
        self.last_lam, self.last_op = 1.0, "none"

    def seed(self, seed: int):
        self._rng = np.random.default_rng(seed)
        for i, (_, op) in enumerate(self.ops):
            op.seed([seed, i + 1])  # independent stream per sub-op

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state,
                **{name: op.state_dict() for name, op in self.ops}}

    def set_state_dict(self, state):
        self._rng.bit_generator.state = state["rng"]
        for name, op in self.ops:
            op.set_state_dict(state[name])

    def __call__(self, images, labels):
        u, edge = float(self._rng.random()), 0.0
        for (name, op), prob in zip(self.ops, self.probs):
            edge += prob
            if u < edge:
                out = op(images, labels)
                self.last_lam, self.last_op = op.last_lam, name
                return out
        self.last_lam, self.last_op = 1.0, "none"
        return images, labels


def _reprefix(err, prefix):
    """Re-raise a ConfigError from inside a constructor under the full config path."""
    raw = str(err)[len(err.path) + 2:] if err.path else str(err)
    return ConfigError(f"{prefix}.{err.path}" if err.path else prefix, raw)


def build_batch_op(ops_list, class_num: Optional[int], path: str = "batch_transform_ops"):
    """Build ``batch_transform_ops`` (a one-entry YAML list) into a callable, or None if empty.

    ``class_num`` is ``Arch.class_num``; mixing needs it for the one-hot targets.
    """
    if not ops_list:
        return None
    if not isinstance(ops_list, (list, tuple)):
        raise ConfigError(path, f"expected a list with one batch operator, got {ops_list!r}")
    if len(ops_list) != 1:
        raise ConfigError(path, f"got {len(ops_list)} batch operators; use one, or OpSampler "
                                "to pick between MixupOperator and CutmixOperator per batch")
    entry = ops_list[0]
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{path}.0", f"expected '- OpName: {{...}}', got {entry!r}")
    (name, kwargs), = entry.items()
    where = f"{path}.0.{name}"
    BATCH_OPS.get(name, f"{path}.0")
    if class_num is None:
        raise ConfigError("Arch.class_num", f"must be set when {name} is used ({where})")
    try:
        return BATCH_OPS.build(name, kwargs or {}, where, class_num=class_num)
    except ConfigError as e:
        if e.path.startswith(where):
            raise
        raise _reprefix(e, where) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(where, str(e)) from e
