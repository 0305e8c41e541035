"""Honest scores: temperature scaling and expected calibration error (ECE), in numpy.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
logits by one scalar T fitted to minimise the negative log-likelihood on held-out labelled data.
It never changes the top-1 class, only how confident the scores are. Fine-tuned networks are
usually over-confident (T > 1).

The fit is a 1-D golden-section search over beta = 1/T: NLL(beta) = mean(logsumexp(beta z) -
beta z_y) is convex in beta (logsumexp of a linear function is convex), so the search finds the
global minimum of the bracket [1/T_MAX, 1/T_MIN].
"""
import numpy as np

T_MIN, T_MAX = 0.05, 20.0
ECE_BINS = 15  # the bin count of Guo et al. and most papers since


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits, temperature=1.0):
    return np.exp(_log_softmax(np.asarray(logits, np.float64) / float(temperature)))


def nll(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits / T)``."""
    logp = _log_softmax(np.asarray(logits, np.float64) / float(temperature))
    return float(-logp[np.arange(len(labels)), np.asarray(labels, np.int64)].mean())


def fit_temperature(logits, labels, tol=1e-5, max_iter=200):
    """The T in [T_MIN, T_MAX] minimising ``nll(logits, labels, T)`` (golden section on 1/T)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_temperature needs logits [N, K] and N labels, got {logits.shape} "
                         f"and {labels.shape}")
    f = lambda beta: nll(logits * beta, labels)  # noqa: E731
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(max_iter):  # the bracket shrinks by 0.618 per step: ~40 steps reach 1e-5
        if hi - lo < tol:
            break
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return float(1.0 / ((lo + hi) / 2.0))


def expected_calibration_error(probs, labels, bins=ECE_BINS):
    """ECE: over ``bins`` equal-width confidence bins (lo, hi], the image-weighted mean of
    |accuracy - mean confidence|, where confidence is the top score."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64).reshape(-1)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    # Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 joins bin 0.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(bins) - 1)
    total = 0.0
    for b in range(int(bins)):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total / len(labels))


def calibration_report(logits, labels, bins=ECE_BINS):
    """Fit T on all of ``logits``/``labels`` and report the fit: ``temperature``, ECE and NLL
    before and after, and ``ece_after_crossfit``, the ECE when each half of the data (even and
    odd positions) is scaled by the T fitted on the other half, an estimate that has not seen the
    images it scores (ECE after on the fitting set itself is optimistic)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64).reshape(-1)
    t = fit_temperature(logits, labels)
    crossfit = np.empty_like(logits)
    halves = (np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1)
    for fit_on, score in (halves, halves[::-1]):
        if fit_on.any() and score.any():
            crossfit[score] = softmax(logits[score], fit_temperature(logits[fit_on], labels[fit_on]))
        else:  # a single image: nothing to hold out
            crossfit[score] = softmax(logits[score], t)
    return {"temperature": t, "fitted_on": int(len(labels)), "ece_bins": int(bins),
            "ece_before": expected_calibration_error(softmax(logits), labels, bins),
            "ece_after": expected_calibration_error(softmax(logits, t), labels, bins),
            "ece_after_crossfit": expected_calibration_error(crossfit, labels, bins),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
            "top1": float((logits.argmax(axis=1) == labels).mean())}
