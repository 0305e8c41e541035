"""The export certificate: the exported graph, run by paddle-inference, against the dygraph model.

Both run on the same float32 batches (the eval set, a stated part of it, or a few random inputs
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
    from ..data.loader import build_dataloader

    section = (cfg.get("DataLoader") or {}).get("Eval")
    if section is None:
        return None
    loader = build_dataloader(section, "Eval", seed=int((cfg.get("Global") or {}).get("seed") or 0),
                              class_num=class_num, path="DataLoader.Eval")
    total = len(loader.dataset)

    def batches():
        seen = 0
        for images, labels, _ in loader:
            images, labels = images.numpy(), labels.numpy().reshape(-1)
            if limit is not None:
                images, labels = images[:limit - seen], labels[:limit - seen]
            if len(images):
                yield images, labels
            seen += len(images)
            if limit is not None and seen >= limit:
                return

    used = total if limit is None else min(int(limit), total)
    what = "all" if used == total else f"the first {used}"
    return batches(), f"DataLoader.Eval: {what} of {total} images (Export.certify_samples)"


def certify(model, save_dir, batches, inputs, atol=DEFAULT_ATOL):
    """Compare dygraph and paddle-inference on ``batches``; write the certificate.

    Returns ``(certificate, logits, labels)`` (labels ``None`` for random inputs). Raises
    ``ExportError`` naming the certificate when the export disagrees beyond ``atol``.
    """
    from ..predictor import Predictor

    save_dir = Path(save_dir)
    predictor = Predictor(save_dir)  # the serving default: oneDNN, every core
    was_training = model.training
    model.eval()
    all_logits, all_labels, max_diff, disagree, real_disagree, n = [], [], 0.0, 0, 0, 0
    try:
        for images, labels in batches:
            with paddle.no_grad():
                logits = model(paddle.to_tensor(images)).astype("float32").numpy()
            ref, served = softmax(logits), predictor.run_graph(images).astype(np.float64)
            max_diff = max(max_diff, float(np.abs(ref - served).max()))
            differs = ref.argmax(1) != served.argmax(1)
            top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
            disagree += int(differs.sum())
            real_disagree += int((differs & (top2[:, 1] - top2[:, 0] > 2 * atol)).sum())
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
    problems = []
    if max_diff > atol:
        problems.append(f"largest probability difference {max_diff:.3g} > Export.certify_atol {atol:g}")
    if real_disagree:
        problems.append(f"top-1 differs on {real_disagree} of {n} images whose top-2 margin exceeds "
                        f"{2 * atol:g}")
    spec = read_spec(save_dir)
    cert = {"passed": not problems, "problems": problems, "inputs": inputs, "samples": n,
            "reference": "dygraph model, eval mode, float32, softmax",
            "engine": "paddle-inference CPU, oneDNN on (the Predictor and service default)",
            "top1_agreement": (n - disagree) / n, "top1_disagreements": disagree,
            "max_abs_prob_diff": max_diff, "tolerance": {"max_abs_prob_diff": atol},
            "model_file": spec.model_file if spec else None, "paddle_version": paddle.__version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = save_dir / CERTIFICATE_FILE
    path.write_text(json.dumps(cert, indent=2) + "\n", encoding="utf-8")
    if problems:
        raise ExportError(f"{path}: the exported model does not predict what the dygraph model "
                          f"predicts ({'; '.join(problems)}); do not deploy it. Try another engine "
                          "(Predictor(enable_mkldnn=False)) and report the certificate as a bug")
    labels = np.concatenate(all_labels) if all_labels else None
    return cert, np.concatenate(all_logits), labels
