"""Fine-tuning strategies on the model side, driven by the ``FineTune`` YAML section.

```yaml
FineTune:
  linear_probe: False           # train only the classifier; backbone frozen, its BN statistics too
  freeze_backbone_epochs: 2     # epochs 1..2 train the head only, then the whole network
  unfreeze_lr_factor: 0.1       # after unfreezing, backbone lr = factor x scheduled lr
  layer_decay: 0.75             # layer-wise lr decay: lr x decay^(depth from the head)
  freeze_bn_stats: False        # every batch norm uses and keeps its pretrained statistics
  feature_cache_mb: 2048        # frozen epochs: cache the backbone's features up to this size
```

Why: a randomly initialised head sends large gradients into pretrained features; training the head
first and then the backbone at a lower rate keeps more of what pretraining learned (Kumar et al.
2022, "Fine-Tuning can Distort Pretrained Features"). Freezing is done with ``stop_gradient`` on
the backbone parameters (Paddle skips them in the optimizer and in backward), and the backbone's
batch-norm layers are held in eval mode so their running statistics stay the pretrained ones.

``freeze_bn_stats`` holds *every* batch norm in eval mode while its scale and shift still train
(mmpretrain's ``norm_eval``): with a few images per device the batch statistics are noise, and
it makes a step depend on each image alone, so N devices x batch B equal one device x N*B.
"""
from ..errors import ConfigError


def unwrap(model):
    """The model inside ``paddle.DataParallel``."""
    return getattr(model, "_layers", model)


def _is_norm(layer):
    import paddle.nn as nn
    return isinstance(layer, (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.SyncBatchNorm))


class FineTuneStrategy:
    """Decides, per epoch, which parameters train and at what relative learning rate."""

    def __init__(self, linear_probe=False, freeze_backbone_epochs=0, unfreeze_lr_factor=1.0,
                 layer_decay=None, freeze_bn_stats=False, epochs=1, feature_cache_mb=2048):
        if linear_probe and freeze_backbone_epochs:
            raise ConfigError("FineTune", "set either linear_probe or freeze_backbone_epochs, not both")
        if freeze_backbone_epochs and freeze_backbone_epochs >= epochs:
            raise ConfigError("FineTune.freeze_backbone_epochs",
                              f"is {freeze_backbone_epochs} but Global.epochs is {epochs}: the backbone "
                              f"would never unfreeze; use FineTune.linear_probe: True for that")
        if not 0 < float(unfreeze_lr_factor) <= 10:
            raise ConfigError("FineTune.unfreeze_lr_factor", f"must be in (0, 10], got {unfreeze_lr_factor}")
        if layer_decay is not None and not 0 < float(layer_decay) <= 1:
            raise ConfigError("FineTune.layer_decay", f"must be in (0, 1], got {layer_decay}")
        self.linear_probe = bool(linear_probe)
        self.freeze_backbone_epochs = int(freeze_backbone_epochs or 0)
        self.unfreeze_lr_factor = float(unfreeze_lr_factor)
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        if not float(feature_cache_mb) >= 0:
            raise ConfigError("FineTune.feature_cache_mb", f"must be >= 0 (MB), got {feature_cache_mb}")
        self.feature_cache_mb = float(feature_cache_mb)  # read by engine/frozen.py
        self.frozen = False
        self._factor_applied = False
        self._trainable = None

    @classmethod
    def from_config(cls, section, model, epochs):
        section = dict(section or {})
        return cls(epochs=epochs, **section)

    @property
    def active(self):
        return self.linear_probe or self.freeze_backbone_epochs > 0

    def state_dict(self):
        """What the strategy has done so far, recorded in the checkpoint for its reader;
        ``begin_epoch`` re-derives it from the epoch on resume, so nothing is loaded back."""
        return {"frozen": self.frozen, "unfreeze_lr_applied": self._factor_applied}

    def describe(self):
        parts = [self._describe(), "batch-norm statistics frozen" if self.freeze_bn_stats else ""]
        return "; ".join(p for p in parts if p)

    def _describe(self):
        if self.linear_probe:
            return "linear probe: only the classifier trains, backbone and its BN statistics frozen"
        if self.freeze_backbone_epochs:
            return (f"backbone frozen for epochs 1-{self.freeze_backbone_epochs}, then unfrozen at "
                    f"{self.unfreeze_lr_factor:g}x learning rate")
        return ""

    def begin_epoch(self, model, epoch, logger=None):
        """Apply the state for 1-based ``epoch`` (also right after a resume). Returns a message or None."""
        if not self.active:
            return None
        model = unwrap(model)
        want_frozen = self.linear_probe or epoch <= self.freeze_backbone_epochs
        for param in self._backbone_params(model):
            param.stop_gradient = want_frozen
        msg = None
        if want_frozen and not self.frozen:
            msg = f"epoch {epoch}: backbone frozen ({self.describe()})"
        if not want_frozen and not self._factor_applied:
            self._scale_backbone_lr(model, self.unfreeze_lr_factor)
            self._factor_applied = True
            msg = f"epoch {epoch}: backbone unfrozen, its learning rate x{self.unfreeze_lr_factor:g}"
        self.frozen = want_frozen
        if msg and logger is not None:
            logger.info(msg)
        return msg

    def _backbone_params(self, model):
        """Trainable backbone parameters, remembered on first use: batch-norm running statistics
        are listed by Paddle as parameters with stop_gradient=True and must never be unfrozen."""
        if self._trainable is None:
            self._trainable = [p for n, p in model.named_parameters()
                               if not model.is_classifier_key(n) and not p.stop_gradient]
        return self._trainable

    def _scale_backbone_lr(self, model, factor):
        for param in self._backbone_params(model):
            attr = param.optimize_attr
            attr["learning_rate"] = attr.get("learning_rate", 1.0) * factor

    def train_mode(self, model):
        """``model.train()``, except: while the backbone is frozen, every backbone layer is in eval
        mode (its batch-norm statistics stay the pretrained ones, and its dropout and drop-path
        are off: a frozen backbone is one fixed function, on any number of processes, which is
        what lets engine/frozen.py cache it); with ``freeze_bn_stats``, every norm layer is."""
        model.train()
        if not (self.frozen or self.freeze_bn_stats):
            return
        inner = unwrap(model)
        for name, layer in inner.named_sublayers():
            in_head = inner.is_classifier_key(name + ".")
            if (self.frozen and not in_head) or (self.freeze_bn_stats and _is_norm(layer)):
                layer.eval()
