"""Mixed precision from PaddleClas's ``AMP`` section, with one code path for every device.

```yaml
AMP:
  use_amp: True                  # the section's presence turns AMP on, as in PaddleClas
  level: O1                      # O1: autocast lists; O2: fp16/bf16 weights (fp32 master copies)
  dtype: float16                 # ours: float16 (default) | bfloat16
  scale_loss: 65536.0            # fp16 only: initial loss scale
  use_dynamic_loss_scaling: True # fp16 only
  use_fp16_test: False           # O1: also evaluate under autocast (O2 always does)
  use_promote: False             # Paddle's auto_cast(use_promote=...); False as in PaddleClas
```

What holds everywhere: O2 evaluates under autocast (its weights are low precision, so an eval
outside autocast feeds fp32 images into fp16 layers); the loss and the metrics see float32
logits; checkpoints are float32 (``checkpoint.float32_state``); the loss scaler exists for
float16 only (bfloat16 has fp32's exponent range and needs none).

On the CPU, measured with Paddle 3.3.1: ``paddle.amp.auto_cast`` only switches on for GPU, XPU
and custom devices and warns "makes no effect" elsewhere, and no bfloat16 CPU kernel exists for
``conv2d``. So ``dtype: bfloat16`` on the CPU runs this same code path (decorate, autocast
contexts, fp32 checkpoints) while Paddle computes in float32, and the start-up log says exactly
that; ``dtype: float16`` on the CPU is refused with a warning and trains in fp32.
"""
import contextlib
import warnings
from dataclasses import dataclass

import paddle

from ..errors import ConfigError

DTYPES = ("float16", "bfloat16")


@dataclass
class AmpPolicy:
    enabled: bool = False
    level: str = "O0"
    dtype: str = "float32"
    use_fp16_test: bool = False
    use_promote: bool = False
    scaler_kwargs: dict = None
    note: str = ""

    def autocast(self, training=True):
        """The autocast context for a train step, or for evaluation when the policy says so."""
        on = self.enabled and (training or self.level == "O2" or self.use_fp16_test)
        if not on:
            return contextlib.nullcontext()
        return _quiet_autocast(level=self.level, dtype=self.dtype, use_promote=self.use_promote)

    def make_scaler(self):
        if not self.enabled or self.dtype != "float16":
            return None
        return paddle.amp.GradScaler(**self.scaler_kwargs)

    def decorate(self, model, optimizer):
        """O2: ``paddle.amp.decorate`` (low-precision weights, fp32 master weights, fp32 saves)."""
        if not self.enabled or self.level != "O2":
            return model, optimizer
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*makes no effect.*")
            out = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2",
                                      dtype=self.dtype, save_dtype="float32")
        return out if optimizer is not None else (out, None)  # decorate returns the model alone


@contextlib.contextmanager
def _quiet_autocast(**kwargs):
    # Paddle warns once per step on the CPU that autocast has no effect; the start-up log
    # already says so once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*amp_guard can only be enabled.*")
        with paddle.amp.auto_cast(enable=True, **kwargs):
            yield


def amp_policy(section, device):
    """``AmpPolicy`` from the ``AMP`` section (or None) for ``device`` ('cpu' | 'gpu')."""
    if section is None or not section.get("use_amp", True):
        return AmpPolicy()
    level = str(section.get("level", "O1")).upper()
    if level not in ("O1", "O2"):
        raise ConfigError("AMP.level", f"must be O1 or O2, got {section.get('level')!r}")
    dtype = str(section.get("dtype", "float16")).lower()
    if dtype not in DTYPES:
        raise ConfigError("AMP.dtype", f"must be float16 or bfloat16, got {section.get('dtype')!r}")
    if device != "gpu" and dtype == "float16":
        return AmpPolicy(note="AMP.use_amp is True with float16, which needs a GPU; training in "
                              "fp32 on the CPU (set AMP.dtype: bfloat16 to run the AMP code path "
                              "here, or AMP.use_amp: False to silence this)")
    note = f"AMP {level} {dtype}"
    if device != "gpu":
        note += (" on the CPU: Paddle 3.3.1 runs autocast on GPU/XPU only and has no bfloat16 CPU "
                 "convolution, so this run takes the AMP code path with float32 arithmetic")
    scaler = {"init_loss_scaling": float(section.get("scale_loss", 1.0)),
              "use_dynamic_loss_scaling": bool(section.get("use_dynamic_loss_scaling", False))}
    return AmpPolicy(enabled=True, level=level, dtype=dtype,
                     use_fp16_test=bool(section.get("use_fp16_test", False)),
                     use_promote=bool(section.get("use_promote", False)), scaler_kwargs=scaler,
                     note=note + (f", loss scale {scaler['init_loss_scaling']:g}"
                                  f"{' dynamic' if scaler['use_dynamic_loss_scaling'] else ''}"
                                  if dtype == "float16" else ""))
