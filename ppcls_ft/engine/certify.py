"""The export certificate: the exported graph, run by each CPU engine the export wrote it for
(paddle-inference with oneDNN; ONNX Runtime when ``inference.onnx`` was written), against the
dygraph model.

All run on the same float32 batches (the eval set, a stated part of it, or a few random inputs
when no eval set is configured); the certificate records top-1 agreement and the largest
probability difference in ``export_certificate.json`` beside the model. A difference beyond the
tolerance is an ``ExportError``, not a warning: an export that predicts something else than the
model that was evaluated must not ship. The dygraph logits and labels collected on the way are
what temperature scaling is fitted on (``calibration.py``), so calibration costs no second pass.
"""
import datetime
import json
from pathlib import Path

import numpy as np
import paddle

from ..calibration import softmax
from ..errors import ExportError
from ..inference_format import CERTIFICATE_FILE, read_spec

DEFAULT_ATOL = 1e-4  # probabilities; oneDNN vs dygraph float32 differ by ~1e-6 on the four families
RANDOM_SAMPLES = 4


def random_batches(image_shape, n=RANDOM_SAMPLES, seed=0):
    x = np.random.default_rng(seed).standard_normal([n] + list(image_shape)).astype(np.float32)
    return [(x, None)], f"{n} random normal inputs (no eval set given)"


def eval_batches(cfg, class_num, limit=None):
    """``(images, labels)`` numpy batches from ``DataLoader.Eval``, at most ``limit`` images, and
    a sentence saying what they are; ``None`` when the config has no eval set."""
    from ..data.loader import build_dataloader, close, iterate

    section = (cfg.get("DataLoader") or {}).get("Eval")
    if section is None:
        return None
    loader = build_dataloader(section, "Eval", seed=int((cfg.get("Global") or {}).get("seed") or 0),
                              class_num=class_num, path="DataLoader.Eval")
    total = len(loader.dataset)

    def batches():
        seen = 0
        try:
            for images, labels, _ in iterate(loader):
                images, labels = images.numpy(), labels.numpy().reshape(-1)
                if limit is not None:
                    images, labels = images[:limit - seen], labels[:limit - seen]
                if len(images):
                    yield images, labels
                seen += len(images)
                if limit is not None and seen >= limit:
                    return
        finally:  # its workers are not needed past these batches
            close(loader)

    used = total if limit is None else min(int(limit), total)
    what = "all" if used == total else f"the first {used}"
    return batches(), f"DataLoader.Eval: {what} of {total} images (Export.certify_samples)"


class _Tally:
    """Agreement of one engine with the dygraph reference, accumulated over batches."""

    def __init__(self, atol):
        self.atol, self.max_diff, self.disagree, self.real_disagree = atol, 0.0, 0, 0
        self.error = None  # the engine raised instead of answering

    def add(self, ref, served):
        self.max_diff = max(self.max_diff, float(np.abs(ref - served).max()))
        differs = ref.argmax(1) != served.argmax(1)
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
        self.disagree += int(differs.sum())
        # a flip between two near-equal classes is rounding, not a different model
        self.real_disagree += int((differs & (top2[:, 1] - top2[:, 0] > 2 * self.atol)).sum())

    def report(self, n):
        if self.error is not None:
            return {"passed": False, "problems": [f"the engine failed: {self.error}"],
                    "top1_agreement": None, "top1_disagreements": None, "max_abs_prob_diff": None}
        problems = []
        if self.max_diff > self.atol:
            problems.append(f"largest probability difference {self.max_diff:.3g} > "
                            f"Export.certify_atol {self.atol:g}")
        if self.real_disagree:
            problems.append(f"top-1 differs on {self.real_disagree} of {n} images whose top-2 margin "
                            f"exceeds {2 * self.atol:g}")
        return {"passed": not problems, "problems": problems, "top1_agreement": (n - self.disagree) / n,
                "top1_disagreements": self.disagree, "max_abs_prob_diff": self.max_diff}


def certify(model, save_dir, batches, inputs, atol=DEFAULT_ATOL, runners=None, required=None):
    """Compare dygraph with each engine of ``runners`` (``{name: run_graph}``, default oneDNN) on
    ``batches``; write the certificate.

    Every engine runs the same float32 batches as the dygraph model, which runs once. Returns
    ``(certificate, logits, labels)`` (labels ``None`` for random inputs); ``certificate["engines"]``
    has each engine's result, and the top-level figures are the worst over the engines that
    passed (or over all when a required one failed). Raises ``ExportError`` naming the certificate
    when an engine of ``required`` (default: all) disagrees beyond ``atol``; an engine outside
    ``required`` that fails is only recorded, and the caller must not serve with it.
    """
    from ..predictor import Predictor
    from ..runtimes import DEFAULT_ENGINE, ENGINE_TITLES, ONNX_ENGINE

    save_dir = Path(save_dir)
    runners = runners or {DEFAULT_ENGINE: Predictor(save_dir, engine=DEFAULT_ENGINE).run_graph}
    required = set(runners if required is None else required)
    tallies = {name: _Tally(atol) for name in runners}
    was_training = model.training
    model.eval()
    all_logits, all_labels, n = [], [], 0
    try:
        for images, labels in batches:
            with paddle.no_grad():
                logits = model(paddle.to_tensor(images)).astype("float32").numpy()
            ref = softmax(logits)
            for name, run in runners.items():
                if tallies[name].error is not None:
                    continue
                try:
                    served = run(images)
                except Exception as exc:  # noqa: BLE001 - an optional engine may fail in any way
                    if name in required:
                        raise ExportError(f"{save_dir}: {name} failed on the exported graph ({exc})"
                                          + ("; Global.export_onnx: null ships the model without "
                                             "ONNX" if name == ONNX_ENGINE else "")) from exc
                    tallies[name].error = f"{type(exc).__name__}: {str(exc)[:300]}"
                    continue
                tallies[name].add(ref, served.astype(np.float64))
            n += len(images)
            all_logits.append(logits)
            if labels is not None:
                all_labels.append(labels)
    finally:
        if was_training:
            model.train()
    if n == 0:
        raise ExportError(f"{save_dir}: the certificate has no images to compare (empty eval set?); "
                          "check DataLoader.Eval or Export.certify_samples")
    per_engine = {name: {"engine": ENGINE_TITLES.get(name, name), **tally.report(n)}
                  for name, tally in tallies.items()}
    failed_required = [name for name in required if not per_engine[name]["passed"]]
    counted = [r for name, r in per_engine.items()
               if r["max_abs_prob_diff"] is not None and (r["passed"] or failed_required)]
    problems = [f"{name}: {p}" for name in sorted(failed_required) for p in per_engine[name]["problems"]]
    spec = read_spec(save_dir)
    cert = {"passed": not failed_required, "problems": problems, "inputs": inputs, "samples": n,
            "reference": "dygraph model, eval mode, float32, softmax",
            "engines": per_engine,
            "top1_agreement": min(r["top1_agreement"] for r in counted),
            "top1_disagreements": max(r["top1_disagreements"] for r in counted),
            "max_abs_prob_diff": max(r["max_abs_prob_diff"] for r in counted),
            "tolerance": {"max_abs_prob_diff": atol},
            "model_file": spec.model_file if spec else None, "paddle_version": paddle.__version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = save_dir / CERTIFICATE_FILE
    path.write_text(json.dumps(cert, indent=2) + "\n", encoding="utf-8")
    if failed_required:
        hint = ("Global.export_onnx: null ships the model without ONNX when only ONNX Runtime "
                "disagrees" if ONNX_ENGINE in failed_required else
                "check the model; Export.certify_atol sets the tolerance")
        raise ExportError(f"{path}: the exported model does not predict what the dygraph model "
                          f"predicts ({'; '.join(problems)}); do not deploy it ({hint}) and report "
                          "the certificate as a bug")
    labels = np.concatenate(all_labels) if all_labels else None
    return cert, np.concatenate(all_logits), labels
