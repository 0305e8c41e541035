"""Export a trained classifier for deployment: ``paddle.jit.save`` + ``inference.yml``.

The exported directory is self-describing, so the served model predicts what the trained model
predicted (the top PaddleClas complaint is that it does not):

- ``inference.json`` + ``inference.pdiparams`` (Paddle 3 / PIR; a process started with
  ``FLAGS_enable_pir_api=0`` writes ``inference.pdmodel`` instead and the Predictor reads both);
  the graph is the model followed by a softmax, input ``x`` of shape ``[None] + image_shape``,
  as in PaddleClas;
- ``inference.yml``: model name, class_num, image_shape, the eval preprocessing op list, top-k and
  label names, and the ppcls_ft and paddle versions; its schema and its readers belong to
  ``ppcls_ft/inference_format.py`` (this module only fills an ``InferenceSpec``);
- ``inference.onnx`` when paddle2onnx and onnxruntime are installed (``Global.export_onnx``);
- ``export_certificate.json``: every engine written for, against the dygraph model
  (``certify.py``); the certified engines are timed here and the fastest per batch size is
  recorded for the Predictor (``runtimes.py``).

Weights are loaded strictly: PaddleClas's export "loads" any file (Paddle's ``set_state_dict`` skips
missing keys with a warning) and ships random weights.
"""
import os
from pathlib import Path

import paddle

from ..calibration import ECE_BINS, calibration_report
from ..data.dataset import class_folders
from ..errors import ConfigError, ExportError
from ..inference_format import (EXPORT_FILES, MODEL_FORMATS, InferenceSpec, complete_preprocess,
                                read_label_file, write_spec)

from ..runtimes import DEFAULT_ENGINE, ONNX_ENGINE, ONNX_FILE
from ..utils.captured import captured_output
from .certify import DEFAULT_ATOL, certify, eval_batches, random_batches

DEFAULT_SERVE_BATCH = 8  # the service's --max_batch default: the batch the engines are timed at

_ONNX_HINT = "pip install paddle2onnx onnxruntime"


class SoftmaxClassifier(paddle.nn.Layer):
    """The served graph: logits -> probabilities (PaddleClas exports the same)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return paddle.nn.functional.softmax(self.model(x), axis=-1)


def eval_preprocess_ops(cfg):
    """``Infer.transforms`` if given, else ``DataLoader.Eval.dataset.transform_ops`` + ToCHWImage."""
    infer_ops = (cfg.get("Infer") or {}).get("transforms")
    if infer_ops:
        return complete_preprocess(infer_ops)
    eval_ops = ((((cfg.get("DataLoader") or {}).get("Eval") or {}).get("dataset") or {})
                .get("transform_ops"))
    if not eval_ops:
        raise ConfigError("Infer.transforms", "the export needs the eval preprocessing: set "
                          "Infer.transforms or DataLoader.Eval.dataset.transform_ops")
    return complete_preprocess(eval_ops)


def label_names_from_config(cfg, class_num):
    """Label names: ``Infer.PostProcess.class_id_map_file``, else ``label_list.txt`` beside the
    dataset's ``cls_label_path`` (Eval, then Train), else the class folders of an
    ``ImageFolderDataset``, else ``None``."""
    post = (cfg.get("Infer") or {}).get("PostProcess") or {}
    if post.get("class_id_map_file"):
        return read_label_file(post["class_id_map_file"], class_num,
                               "Infer.PostProcess.class_id_map_file")
    for mode in ("Eval", "Train"):
        dataset = (((cfg.get("DataLoader") or {}).get(mode) or {}).get("dataset") or {})
        if dataset.get("cls_label_path"):
            candidate = Path(dataset["cls_label_path"]).parent / "label_list.txt"
            if candidate.is_file():
                return read_label_file(candidate, class_num,
                                       f"DataLoader.{mode}.dataset.cls_label_path")
        if dataset.get("name") == "ImageFolderDataset" and Path(str(dataset.get("image_root"))).is_dir():
            return class_folders(dataset["image_root"])
    return None


def _written_model_file(save_dir):
    for model_name, params_name in MODEL_FORMATS:
        if (save_dir / model_name).is_file() and (save_dir / params_name).is_file():
            return save_dir / model_name, save_dir / params_name
    raise RuntimeError(f"paddle.jit.save wrote neither inference.json nor inference.pdmodel in {save_dir}")


def export_dygraph(model, save_dir, image_shape, preprocess_ops, label_names=None, *,
                   model_name=None, topk=5, export_onnx=None, reject_threshold=None,
                   certify_on=None, certify_atol=DEFAULT_ATOL, calibrate=False, ece_bins=ECE_BINS,
                   choose_engine=True, serve_batch=DEFAULT_SERVE_BATCH):
    """Save ``model`` (a dygraph Layer) + softmax as an inference model in ``save_dir``, certify it
    and optionally calibrate it.

    ``preprocess_ops`` is the eval op list (YAML form); ``label_names`` a list indexed by class id
    or ``None``. ``certify_on`` is ``(batches, description)`` with ``batches`` yielding
    ``(float32 NCHW, int labels or None)`` (``certify.eval_batches``); by default a few random
    inputs. ``calibrate`` fits the temperature on those batches, so it needs labelled ones.
    ``reject_threshold`` is stored for the readers. ``export_onnx``: ``None`` (default) writes
    ``inference.onnx`` too when paddle2onnx and onnxruntime are installed, ``True`` requires it,
    ``False`` never. With more than one certified engine, ``choose_engine`` times them at batch 1
    and ``serve_batch`` and records the fastest for ``Predictor(engine="auto")`` (runtimes.py).
    Returns the directory. The model's train/eval mode is restored afterwards, so the trainer can
    export mid-training.
    """
    if calibrate and certify_on is None:  # before the slow part
        raise ConfigError("Export.calibrate", "needs labelled images to fit the temperature on: "
                          "configure DataLoader.Eval (the val set), or set Export.calibrate=False")
    image_shape = [int(v) for v in image_shape]
    if len(image_shape) != 3:
        raise ConfigError("Global.image_shape", f"must be [C, H, W], got {image_shape}")
    class_num = getattr(model, "class_num", None)
    if label_names is not None and class_num is not None and len(label_names) != class_num:
        raise ValueError(f"{len(label_names)} label names for a model with class_num={class_num}; "
                         "pass one name per class")
    if export_onnx:
        _require_onnx_tools()
    elif export_onnx is None:  # auto: when both tools are installed
        export_onnx = None if not _missing_onnx_tools() else False
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        (save_dir / name).unlink(missing_ok=True)

    was_training = model.training
    model.eval()
    try:
        traced = model.for_export() if hasattr(model, "for_export") else model
        traced.eval()
        net = SoftmaxClassifier(traced)
        net.eval()
        spec = paddle.static.InputSpec([None] + image_shape, "float32", name="x")
        static_net = paddle.jit.to_static(net, input_spec=[spec], full_graph=True)
        paddle.jit.save(static_net, str(save_dir / "inference"))
    finally:
        if was_training:
            model.train()

    model_file, params_file = _written_model_file(save_dir)
    spec = InferenceSpec(transform_ops=complete_preprocess(preprocess_ops),
                         model_name=model_name or type(model).__name__, class_num=class_num,
                         image_shape=image_shape, input_name="x", model_file=model_file.name,
                         params_file=params_file.name, topk=int(topk),
                         label_list=list(label_names) if label_names is not None else None,
                         reject_threshold=reject_threshold,
                         extra={"ppcls_ft_version": _ppcls_ft_version(),
                                "paddle_version": paddle.__version__})
    write_spec(save_dir, spec)  # readable before the certificate, which runs the Predictor on it
    engines = [DEFAULT_ENGINE]
    if export_onnx is not False and _convert_to_onnx(save_dir, required=bool(export_onnx)):
        engines.append(ONNX_ENGINE)
        spec.extra["onnx_file"] = ONNX_FILE
    batches, inputs = certify_on or random_batches(image_shape)
    # ONNX Runtime must pass when the user asked for ONNX; in auto mode a failing ONNX file is
    # deleted and never served (the certificate still records why).
    runners = _runners(save_dir, engines, serve_batch, required=bool(export_onnx))
    try:
        cert, logits, labels = certify(model, save_dir, batches, inputs, certify_atol, runners,
                                       required=engines if export_onnx else [DEFAULT_ENGINE])
    except ExportError:
        (save_dir / ONNX_FILE).unlink(missing_ok=True)  # never leave an uncertified graph behind
        raise
    certified = [name for name in engines if cert["engines"].get(name, {}).get("passed")]
    if ONNX_ENGINE in engines and ONNX_ENGINE not in certified:
        (save_dir / ONNX_FILE).unlink(missing_ok=True)
        spec.extra.pop("onnx_file", None)
        if ONNX_ENGINE in cert["engines"]:  # else _runners has said why it could not start
            _logger().warning(f"export: ONNX Runtime failed the certificate "
                              f"({'; '.join(cert['engines'][ONNX_ENGINE]['problems'])}); "
                              "inference.onnx removed, the model is served with paddle-inference")
    if calibrate:
        if labels is None:
            raise ConfigError("Export.calibrate", f"the certificate ran on {inputs}, which have no "
                              "labels; configure DataLoader.Eval with the val set")
        report = calibration_report(logits, labels, ece_bins)
        spec.temperature = report.pop("temperature")
        spec.calibration = {**report, "fitted_on_inputs": inputs}
    spec.engines = {"certified": certified}
    if choose_engine and len(certified) > 1:
        spec.engines.update(measure_engines({k: runners[k] for k in certified}, image_shape, serve_batch))
    write_spec(save_dir, spec)
    return save_dir


def export_inference_model(cfg, save_dir=None, allow_random=False):
    """Build ``cfg["Arch"]``, load ``Global.pretrained_model`` strictly, export; returns the directory.

    ``allow_random=True`` exports untrained weights when no ``pretrained_model`` is set (for speed
    tests); otherwise a missing ``pretrained_model`` is an error.
    """
    from ..models import build_model
    from ..utils.logger import get_logger
    from .builder import build_model_for

    glob = cfg.get("Global") or {}
    arch = cfg.get("Arch") or {}
    if not arch.get("name"):
        raise ConfigError("Arch.name", "the export needs the model name, e.g. Arch.name: PPLCNet_x1_0")
    if glob.get("export_onnx"):  # fail before the slow part
        _require_onnx_tools()
    source = glob.get("pretrained_model")
    if not source and not allow_random:
        raise ConfigError("Global.pretrained_model", "set it to the trained weights to export "
                          "(e.g. -o Global.pretrained_model=output/best_model); exporting random "
                          "weights needs --allow-random (allow_random=True in Python)")
    if source:  # strict, and a classifier of another class count is an error, not a fresh head
        model = build_model_for(cfg, get_logger(None), for_training=False)
    else:
        model = build_model(arch, load_weights=False)
    return export_model_with_config(model, cfg, save_dir)


def export_model_with_config(model, cfg, save_dir=None):
    """Export a model object (e.g. the trainer's best model) with everything else from ``cfg``:
    image_shape, eval preprocessing, label names, top-k, ONNX, and the ``Export`` section
    (certificate on the eval set, calibration, reject threshold; docs/deploy.md)."""
    glob = cfg.get("Global") or {}
    arch = cfg.get("Arch") or {}
    exp = cfg.get("Export") or {}
    save_dir = Path(save_dir or glob.get("save_inference_dir") or "./inference")
    image_shape = glob.get("image_shape") or [3, 224, 224]
    class_num = getattr(model, "class_num", arch.get("class_num"))
    post = (cfg.get("Infer") or {}).get("PostProcess") or {}
    calibrate = bool(exp.get("calibrate", False))
    return export_dygraph(model, save_dir, image_shape, eval_preprocess_ops(cfg),
                          label_names_from_config(cfg, class_num),
                          model_name=str(arch.get("name") or type(model).__name__).strip(),
                          topk=post.get("topk", 5), export_onnx=glob.get("export_onnx"),
                          reject_threshold=exp.get("reject_threshold"),
                          certify_on=_certify_inputs(cfg, class_num, exp, calibrate),
                          certify_atol=float(exp.get("certify_atol", DEFAULT_ATOL)),
                          calibrate=calibrate, ece_bins=int(exp.get("ece_bins", ECE_BINS)),
                          choose_engine=bool(exp.get("choose_engine", True)),
                          serve_batch=int(exp.get("serve_batch", DEFAULT_SERVE_BATCH)))


def _certify_inputs(cfg, class_num, exp, calibrate):
    """The eval set (or its first ``Export.certify_samples`` images); random inputs when there is
    none, when ``certify_samples`` is 0, or when its files are not there (the unchanged
    PaddleClas configs point at ./dataset/ILSVRC2012) and no calibration needs it."""
    from ..errors import DataError
    from ..utils.logger import get_logger

    samples = exp.get("certify_samples")
    if samples == 0:
        return None if calibrate else random_batches(cfg["Global"].get("image_shape") or [3, 224, 224])
    try:
        return eval_batches(cfg, class_num, samples)
    except (DataError, ConfigError, OSError) as exc:
        if calibrate:
            raise
        get_logger(None).warning(f"export certificate: DataLoader.Eval is not usable ({exc}); "
                                 "certifying on random inputs instead")
        return None


def _runners(save_dir, engines, serve_batch, required):
    """``{engine: run_graph}`` for the certificate. An optional engine (ONNX Runtime in the
    default mode) that cannot even start is left out, with a log line; the certificate then
    records nothing for it and it is never served."""
    from ..predictor import Predictor

    runners = {}
    for name in engines:
        try:
            runners[name] = Predictor(save_dir, engine=name, batch_size=serve_batch).run_graph
        except Exception as exc:  # noqa: BLE001 - onnxruntime may refuse a file in many ways
            if required or name == DEFAULT_ENGINE:
                raise
            _logger().warning(f"export: {name} cannot load the exported graph ({str(exc)[:300]}); "
                              "serving with paddle-inference only")
    return runners


def _missing_onnx_tools():
    missing = []
    for module in ("paddle2onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


def _require_onnx_tools():
    missing = _missing_onnx_tools()
    if missing:
        raise ConfigError("Global.export_onnx", f"ONNX export needs {' and '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: run `{_ONNX_HINT}`, "
                          "or set Global.export_onnx=False")


def _logger():
    from ..utils.logger import get_logger

    return get_logger(None)


def _convert_to_onnx(save_dir, required):
    """``inference.onnx`` beside the Paddle graph; True when written. A failed conversion raises
    when ``required`` (Global.export_onnx: True), else is logged and the export goes on without it."""
    try:
        export_onnx_model(save_dir)
        return True
    except Exception as exc:  # noqa: BLE001 - paddle2onnx raises anything; auto mode must not fail
        if required:
            (Path(save_dir) / ONNX_FILE).unlink(missing_ok=True)
            raise ExportError(f"Global.export_onnx: True, but paddle2onnx could not convert the model "
                              f"({str(exc)[:500]}); set Global.export_onnx: null to export without "
                              "ONNX when it cannot") from exc
        (Path(save_dir) / ONNX_FILE).unlink(missing_ok=True)
        _logger().warning(f"export: paddle2onnx could not convert the model ({str(exc)[:300]}); "
                          "serving with paddle-inference only")
        return False


def export_onnx_model(save_dir, image_shape=None, opset_version=11):
    """Convert the exported Paddle graph in ``save_dir`` to ``inference.onnx``; returns its path.

    Whether it predicts what the model predicts is the certificate's job (``export_dygraph``
    certifies ONNX Runtime on the same images as paddle-inference). ``image_shape`` is unused
    (the graph carries it) and kept for callers of the 0.1 signature.
    """
    _require_onnx_tools()
    # paddle2onnx's constant folding (polygraphy) otherwise pip-installs onnx_graphsurgeon at run
    # time from an extra index; an export must not install packages behind the user's back.
    os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    import paddle2onnx

    save_dir = Path(save_dir)
    model_file, params_file = _written_model_file(save_dir)
    onnx_file = save_dir / ONNX_FILE
    # opset 11 covers every op of the four families; paddle2onnx raises it itself when needed.
    # Its C++ side and polygraphy print a page per model to stdout; shown only when it fails.
    with captured_output() as out:
        try:
            paddle2onnx.export(str(model_file), str(params_file), save_file=str(onnx_file),
                               opset_version=opset_version)
        except Exception as exc:
            raise RuntimeError(f"paddle2onnx failed on {model_file}: {exc}\n{out.text()[-2000:]}") from exc
    if not onnx_file.is_file():
        raise RuntimeError(f"paddle2onnx wrote no {onnx_file}:\n{out.text()[-2000:]}")
    return onnx_file


def measure_engines(runners, image_shape, serve_batch):
    """The ``Engine`` record of ``inference.yml``: images/s of each certified engine (``{name:
    run_graph}``) at batch 1 and ``serve_batch`` on this machine, and the fastest per batch size."""
    from ..runtimes import fastest, time_engines
    from ..utils.device import available_cores, cpu_simd
    from .. import CPU_VENDOR

    sizes = sorted({1, int(serve_batch)})
    rates = time_engines(runners, image_shape, sizes)
    return {"fastest": fastest(rates), "images_per_s": rates,
            "measured_on": f"{CPU_VENDOR} CPU ({cpu_simd()}), {available_cores()} threads"}


def _ppcls_ft_version():
    from .. import __version__

    return __version__
