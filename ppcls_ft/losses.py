"""Training/eval losses of the PaddleClas YAML (``Loss.Train`` / ``Loss.Eval``).

``build_loss`` turns ``[{CELoss: {weight: 1.0, epsilon: 0.1}}, ...]`` into one Layer whose
forward returns every term by name plus ``loss = sum(weight * term)`` — the names are the log-line
and VisualDL keys (``CELoss``, ``loss``).

``CELoss`` differs from PaddleClas on purpose: soft targets (Mixup/Cutmix) are used as given;
PaddleClas, when ``epsilon`` is unset, passes them through a softmax first, which flattens a
``[0.7, 0.3, 0]`` target to roughly ``[0.46, 0.31, 0.23]``. ``class_weight`` is our extension for
imbalanced fine-tuning sets.
"""
from typing import Optional, Union

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .errors import ConfigError
from .registry import LOSSES


def class_weights_from_counts(counts) -> list:
    """``class_weight: auto``: ``w_c = N / (K * n_c)`` (mean weight over samples is 1).

    A class with no training sample gets weight 0 (it never appears as a target anyway).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class counts must be a non-empty list of non-negative ints, got {counts.tolist()}")
    total, k = counts.sum(), counts.size
    return [float(total / (k * c)) if c > 0 else 0.0 for c in counts]


@LOSSES.register
class CELoss(nn.Layer):
    """Cross-entropy with optional label smoothing, soft targets and per-class weights.

    YAML: ``- CELoss: {weight: 1.0, epsilon: 0.1, class_weight: [1.0, 4.0, 2.0]}``
    (``class_weight: auto`` is resolved from the training label counts by ``build_loss``).

    Target ``q``: hard labels ``[N]``/``[N, 1]`` -> one-hot; soft ``[N, K]`` floats as given. With
    ``epsilon``: ``q = (1 - eps) q + eps / K``. Per sample ``l_i = -sum_k q_ik log_softmax(z_i)_k``;
    the loss is ``mean_i l_i``, or with class weights ``sum_i w_i l_i / sum_i w_i`` where
    ``w_i = w[y_i]`` (soft: ``sum_k q_ik w_k`` on the unsmoothed target).
    """

    def __init__(self, epsilon: Optional[float] = None, class_weight: Optional[Union[list, str]] = None):
        super().__init__()
        if epsilon is not None and not 0.0 <= epsilon < 1.0:
            raise ConfigError("epsilon", f"label smoothing must be in [0, 1), got {epsilon}")
        if isinstance(class_weight, str):
            raise ConfigError("class_weight", f"{class_weight!r} must be resolved to a list before "
                                              "building CELoss (build_loss does it for 'auto' when given "
                                              "class_counts); otherwise write a list of K floats")
        if class_weight is not None:
            w = np.asarray(class_weight, dtype=np.float64)
            if w.ndim != 1 or w.size == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise ConfigError("class_weight", f"must be a list of K non-negative numbers with a "
                                                  f"positive sum, got {class_weight}")
            class_weight = [float(v) for v in w]
        self.epsilon = float(epsilon) if epsilon else None
        self.class_weight = class_weight
        self.path = "CELoss"  # build_loss sets the full config path for runtime errors

    def _target(self, target, k):
        """(target distribution [N, K] float32, raw target [N, K]) from hard or soft labels."""
        if paddle.is_floating_point(target):
            if target.ndim != 2 or target.shape[1] != k:
                raise ValueError(f"{self.path}: soft targets must be [N, {k}] floats, got shape {target.shape}")
            raw = target.astype("float32")
        else:
            if target.ndim == 2 and target.shape[1] == 1:
                target = target.squeeze(1)
            if target.ndim != 1:
                raise ValueError(f"{self.path}: hard labels must be int [N] or [N, 1], got shape {target.shape}")
            raw = F.one_hot(target.astype("int64"), k)
        q = raw if self.epsilon is None else raw * (1.0 - self.epsilon) + self.epsilon / k
        return q, raw

    def forward(self, logits, target):
        k = logits.shape[-1]
        q, raw = self._target(target, k)
        per_sample = -(q * F.log_softmax(logits.astype("float32"), axis=-1)).sum(axis=-1)
        if self.class_weight is None:
            return {"CELoss": per_sample.mean()}
        if len(self.class_weight) != k:
            raise ValueError(f"{self.path}.class_weight: has {len(self.class_weight)} entries but the "
                             f"model outputs {k} classes; give one weight per class")
        w = (raw * paddle.to_tensor(self.class_weight, dtype="float32")).sum(axis=-1)
        # clip: a batch drawn only from zero-weight classes contributes 0, not NaN
        return {"CELoss": (w * per_sample).sum() / paddle.clip(w.sum(), min=1e-12)}


class CombinedLoss(nn.Layer):
    """Weighted sum of named loss terms; forward returns ``{term names..., "loss": total}``."""

    def __init__(self, terms, weights):
        super().__init__()
        self.terms = nn.LayerList(terms)
        self.weights = list(weights)

    def forward(self, logits, target):
        out, total = {}, None
        for term, weight in zip(self.terms, self.weights):
            for key, value in term(logits, target).items():
                out[key] = value
                total = value * weight if total is None else total + value * weight
        out["loss"] = total
        return out


def _entry(entry, i, path):
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{path}.{i}", f"each entry is one mapping like {{CELoss: {{weight: 1.0}}}}, got {entry!r}")
    name, kwargs = next(iter(entry.items()))
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"{path}.{i}.{name}", f"expected a mapping of options, got {kwargs!r}")
    return name, dict(kwargs or {})


def build_loss(loss_list, path: str = "Loss.Train", *, class_counts: Optional[list] = None) -> nn.Layer:
    """Build ``Loss.Train``/``Loss.Eval`` (a list of ``{Name: {weight, ...}}``) into one Layer.

    ``class_counts`` (training samples per class) resolves ``class_weight: auto``.
    """
    if not isinstance(loss_list, list) or not loss_list:
        raise ConfigError(path, "must be a non-empty list like [{CELoss: {weight: 1.0}}]")
    terms, weights, seen = [], [], set()
    for i, entry in enumerate(loss_list):
        name, kwargs = _entry(entry, i, path)
        here = f"{path}.{i}.{name}"
        weight = kwargs.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{here}.weight", f"must be a number, got {weight!r}")
        if len(loss_list) == 1 and weight != 1.0:
            # PaddleClas returns a lone loss unweighted; configs written for it (weight: 0.5 on
            # their only loss) must train the same here, so the weight is dropped, and said so.
            from .config import warn_no_effect
            warn_no_effect(f"{here}.weight", "a lone loss is used unweighted, as in PaddleClas; "
                                             "weights only balance two or more losses")
            weight = 1.0
        if name in seen:
            raise ConfigError(here, f"{name} is listed twice; merge the entries")
        seen.add(name)
        if kwargs.get("class_weight") == "auto":
            if class_counts is None:
                raise ConfigError(f"{here}.class_weight", "'auto' needs the training label counts; "
                                                          "the trainer passes them (or write a list)")
            kwargs["class_weight"] = class_weights_from_counts(class_counts)
        try:
            term = LOSSES.build(name, kwargs, here)
        except ConfigError as err:
            if str(err.path).startswith(path):
                raise
            raise ConfigError(f"{here}.{err.path}", str(err)[len(err.path) + 2:]) from None
        term.path = here
        terms.append(term)
        weights.append(float(weight))
    return CombinedLoss(terms, weights)
