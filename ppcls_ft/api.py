"""The Python API for notebooks: the same runs the tools do, returning the same results.

```python
import ppcls_ft
result = ppcls_ft.train("configs/MobileNetV2.yaml", ["Arch.class_num=5", "Global.epochs=3"])
metrics = ppcls_ft.evaluate("configs/MobileNetV2.yaml", ["Arch.class_num=5"],
                            weights="output/best_model")
model_dir = ppcls_ft.export("configs/MobileNetV2.yaml", ["Arch.class_num=5"], weights="output/best_model")
preds = ppcls_ft.Predictor(model_dir).predict(["photo.jpg"])
```

``config`` is a YAML path (what ``-c`` takes) or an already loaded dict; ``overrides`` are the
``-o`` strings. Errors are the tools' errors (``ConfigError`` and friends) raised, not printed.
"""
import copy

from .config import apply_overrides, load_config, validate_config


def _config(config, overrides):
    if isinstance(config, dict):
        cfg = apply_overrides(copy.deepcopy(config), overrides)
        validate_config(cfg)
        return cfg
    return load_config(config, list(overrides or ()))


def train(config, overrides=None):
    """Train (or resume) like ``tools/train.py``; returns the results also written to
    ``train_results.json``: history, best_top1, best_epoch, diagnosis, eval_results (per class)."""
    from .engine.run import train as run_train
    return run_train(_config(config, overrides))


def evaluate(config, overrides=None, weights=None):
    """Evaluate like ``tools/eval.py`` (``weights`` = ``Global.pretrained_model``); returns
    top-k, losses, ``per_class`` and ``confusion_matrix`` (also in ``eval_results.json``)."""
    from .engine.run import evaluate_config
    extra = [f"Global.pretrained_model={weights}"] if weights is not None else []
    return evaluate_config(_config(config, list(overrides or ()) + extra))


def export(config, overrides=None, weights=None):
    """Export like ``tools/export_model.py``; returns the inference model directory."""
    from .engine.export import export_inference_model
    extra = [f"Global.pretrained_model={weights}"] if weights is not None else []
    return export_inference_model(_config(config, list(overrides or ()) + extra))
